#!/usr/bin/env bash
# `make test`: the whole workspace test suite, then one line summing every test binary's result.
# `make faults`: the fault suite alone, summed the same way.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
# Arguments choose what to run (`make faults`: -p aq-tests --test faults); none, everything.
if [ "$#" -eq 0 ]; then set -- --workspace; fi
cargo test --locked "$@" 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' target/test-output.log
exit "$status"
