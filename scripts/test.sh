#!/usr/bin/env bash
# README command 2: install what is missing, then build and run the whole test suite under every
# checking preset (g++ -Werror, clang++ -Werror, ASan+UBSan, TSan), run the examples (they are CTest
# tests), and build the benchmarks and run each one briefly as a smoke test (no timing assertions).
#
# Usage: scripts/test.sh [preset ...]      (default: dev clang asan-ubsan tsan bench)
set -euo pipefail
cd "$(dirname "$0")/.."

presets=("$@")
[[ ${#presets[@]} -eq 0 ]] && presets=(dev clang asan-ubsan tsan bench)
jobs="${SLUICE_JOBS:-$(nproc)}"

scripts/install-deps.sh

total_passed=0
total_failed=0
started=$SECONDS
for preset in "${presets[@]}"; do
  echo "==== preset: $preset ===="
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  if [[ "$preset" == "bench" ]]; then
    for bench in build/bench/bench/*_bench; do
      echo "---- smoke: $bench"
      if "$bench" --benchmark_min_time=0.01 >"build/bench/$(basename "$bench").smoke.txt" 2>&1; then
        total_passed=$((total_passed + 1))
      else
        echo "FAILED: $bench"; tail -n 30 "build/bench/$(basename "$bench").smoke.txt"
        total_failed=$((total_failed + 1))
      fi
    done
    continue
  fi
  log="build/$preset/ctest.log"
  set +e
  ctest --preset "$preset" -j "$jobs" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  summary=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$log" | tail -n 1 || true)
  if [[ -z "$summary" ]]; then
    echo "FAILED: no CTest summary for preset $preset"; total_failed=$((total_failed + 1)); continue
  fi
  out_of=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$summary")
  failed=$(sed -E 's/.*tests passed, ([0-9]+) tests? failed.*/\1/' <<<"$summary")
  total_passed=$((total_passed + out_of - failed))
  total_failed=$((total_failed + failed))
  if [[ $status -ne 0 && $failed -eq 0 ]]; then total_failed=$((total_failed + 1)); fi
done

echo "==== sluice: ${presets[*]} in $((SECONDS - started)) s ===="
echo "tests: $total_passed passed, $total_failed failed"
[[ $total_failed -eq 0 ]]
