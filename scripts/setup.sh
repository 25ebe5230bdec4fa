#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test aq: etcd (server and etcdctl),
# protoc, a C compiler, Chromium (the scope map's browser test), the wasm32-wasip2 Rust target,
# and the Python and JavaScript policy
# toolchains (componentize-py in a venv, componentize-js in node_modules, both under
# target/tools). Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# A C compiler: Rust links with it, and ring (TLS, signatures) compiles a little C.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# Python policies: a venv (Debian keeps venv's pip bootstrap in python3-venv).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
# JavaScript policies: Node.js and npm.
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
# The scope map's browser test: headless Chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install ${need_apt[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup: installing ${need_apt[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 Rust target"
  rustup target add wasm32-wasip2
fi

# The policy toolchains, pinned in scripts/policy-tools and installed again only when a pin changes.
pins=scripts/policy-tools
tools=target/tools
mkdir -p "$tools"
if ! cmp -s "$pins/requirements.txt" "$tools/python/requirements.txt"; then
  echo "setup: installing componentize-py into $tools/python"
  rm -rf "$tools/python"
  python3 -m venv "$tools/python"
  "$tools/python/bin/pip" install --quiet --disable-pip-version-check -r "$pins/requirements.txt"
  cp "$pins/requirements.txt" "$tools/python/requirements.txt"
fi
if ! cmp -s "$pins/package-lock.json" "$tools/js/installed-lock.json"; then
  echo "setup: installing componentize-js into $tools/js"
  rm -rf "$tools/js"
  mkdir -p "$tools/js"
  cp "$pins/package.json" "$pins/package-lock.json" "$tools/js/"
  (cd "$tools/js" && npm ci --quiet --no-audit --no-fund >/dev/null)
  cp "$pins/package-lock.json" "$tools/js/installed-lock.json"
fi
