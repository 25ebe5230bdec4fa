#!/usr/bin/env bash
# `make run`: aq over managed etcd with the built-in policies and the default layout. The etcd API
# listens on 127.0.0.1:2379; data lives in ./aq-data. The admin API (127.0.0.1:7070) is not built
# yet. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "aq: the admin API (127.0.0.1:7070) is not available yet; only the etcd API is served"
exec ./target/release/aq serve --data-dir aq-data --listen 127.0.0.1:2379
