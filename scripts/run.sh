#!/usr/bin/env bash
# `make run`: what aq can run today. The policy engine and the built-in policies are ready; the
# etcd gateway (127.0.0.1:2379) and the admin API (127.0.0.1:7070) are not built yet, so nothing
# listens. This shows each built-in component and checks it on its fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
aq=./target/release/aq
for name in open ephemeral critical quota; do
  echo "== built-in policy: $name"
  "$aq" policy inspect "builtin:$name" | sed -n '2,4p'
  "$aq" policy test "builtin:$name" --config "policies/$name/config.json" "policies/$name/fixtures" | tail -n 1
done
echo
echo "listening: nothing yet — the etcd API (127.0.0.1:2379) and admin API (127.0.0.1:7070) arrive with the gateway."
