#!/usr/bin/env bash
# `make run`: aq over managed etcd with the built-in policies and the default layout. The etcd
# API listens on 127.0.0.1:2379, the admin API (health, readiness, metrics) on 127.0.0.1:7070;
# data lives in ./aq-data. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./target/release/aq serve --data-dir aq-data --listen 127.0.0.1:2379 --admin-listen 127.0.0.1:7070
