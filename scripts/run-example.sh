#!/usr/bin/env bash
# README command 1: install what is missing, build in Release, run the flagship example.
# Usage: scripts/run-example.sh [example-name [arguments...]]
#   default: operator (examples/operator.cpp, the reconcile-loop flagship) when it exists, else
#   channel_fan_in. Any other examples/NAME.cpp runs the same way; arguments go to the program.
set -euo pipefail
cd "$(dirname "$0")/.."

default=channel_fan_in
[[ -f examples/operator.cpp ]] && default=operator
example="${1:-$default}"
[[ $# -gt 0 ]] && shift
if [[ ! -f "examples/$example.cpp" ]]; then
  echo "run-example: no examples/$example.cpp; there are:" \
    "$(cd examples && ls -- *.cpp | sed 's/\.cpp$//' | tr '\n' ' ')" >&2
  exit 2
fi
scripts/install-deps.sh --minimal
# Tests off: running an example needs neither Catch2 nor the benchmark libraries.
cmake --preset release -DSLUICE_BUILD_TESTS=OFF -DSLUICE_BUILD_EXAMPLES=ON >/dev/null
cmake --build --preset release --target "$example"
echo "---- running examples/$example.cpp $* ----"
exec "build/release/examples/$example" "$@"
