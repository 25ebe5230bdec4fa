#!/bin/sh
# Builds policy.wasm (needs the wasm32-wasip2 target: `rustup target add wasm32-wasip2`).
# `cargo test` runs the fixtures natively; `aq policy test` runs them on the component.
set -eu
cd "$(dirname "$0")"
cargo build --quiet --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{crate}}.wasm" policy.wasm
