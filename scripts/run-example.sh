#!/usr/bin/env bash
# README command 1: install what is missing, build in Release, run the flagship example.
# Usage: scripts/run-example.sh [example-name]
set -euo pipefail
cd "$(dirname "$0")/.."

example="${1:-channel_fan_in}"
scripts/install-deps.sh --minimal
cmake --preset release -DSLUICE_BUILD_TESTS=OFF >/dev/null
cmake --build --preset release --target "$example"
echo "---- running examples/$example.cpp ----"
"build/release/examples/$example"
