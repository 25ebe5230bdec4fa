#!/bin/sh
# Builds policy.wasm from app.py with componentize-py 0.25.1 (`pip install componentize-py==0.25.1`,
# or the copy `make test` installs in aq's target/tools/python). COMPONENTIZE_PY names another copy.
set -eu
cd "$(dirname "$0")"
"${COMPONENTIZE_PY:-componentize-py}" -d wit -w governance componentize app -o policy.wasm
