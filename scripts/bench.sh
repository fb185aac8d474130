#!/usr/bin/env bash
# Builds the benchmarks (bench preset: g++ Release) and runs each binary with 3 repetitions in
# random interleaving, so sluice and its peers share the same machine conditions. Writes JSON to
# build/bench/results/ and prints the median table with sluice-vs-peer ratios.
#
# Usage: scripts/bench.sh [component ...]   (default: every bench/*_bench.cpp; e.g. "channel")
# Environment: SLUICE_BENCH_REPS (repetitions, default 3), SLUICE_BENCH_TIMEOUT (seconds one
# binary may run before it is killed and reported as hung, default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cmake --preset bench >/dev/null
cmake --build --preset bench

mkdir -p build/bench/results
components=("$@")
if [[ ${#components[@]} -eq 0 ]]; then
  for f in bench/*_bench.cpp; do components+=("$(basename "$f" _bench.cpp)"); done
fi
limit="${SLUICE_BENCH_TIMEOUT:-1800}"   # seconds per benchmark binary
status=0
for c in "${components[@]}"; do
  out="build/bench/results/${c}.json"
  echo "==== ${c}_bench ===="
  # Bounded like the CI smoke runs: a benchmark that hangs is killed and reported, never waited on.
  set +e
  timeout --signal=KILL "$limit" "build/bench/bench/${c}_bench" \
    --benchmark_repetitions="${SLUICE_BENCH_REPS:-3}" \
    --benchmark_enable_random_interleaving=true --benchmark_display_aggregates_only=true \
    --benchmark_out="$out" --benchmark_out_format=json
  rc=$?
  set -e
  if [[ $rc -eq 137 ]]; then
    echo "bench: FAILED: ${c}_bench hung: killed after ${limit} s (timeout --signal=KILL)" >&2
    status=1; continue
  elif [[ $rc -ne 0 ]]; then
    echo "bench: FAILED: ${c}_bench exited with status $rc" >&2
    status=1; continue
  fi
  python3 scripts/bench_report.py "$out"
done
exit "$status"
