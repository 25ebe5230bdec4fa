#!/bin/sh
# Builds policy.wasm from policy.js with componentize-js 0.23.0
# (`npm install @bytecodealliance/componentize-js@0.23.0 @bytecodealliance/preview2-shim@0.25.0`,
# or the copy `make test` installs in aq's target/tools/js). COMPONENTIZE_JS names another copy.
# Clocks, randomness and the network are left out: aq's sandbox grants none of them.
set -eu
cd "$(dirname "$0")"
"${COMPONENTIZE_JS:-componentize-js}" policy.js --wit wit -n governance \
    -d random clocks http fetch-event -o policy.wasm
