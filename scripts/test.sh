#!/usr/bin/env bash
# README command 2: install what is missing, then build and run the whole test suite under every
# checking preset (g++ -Werror, clang++ -Werror, ASan+UBSan, TSan), run the examples, the README's
# and the headers' code blocks and the package tests (all are CTest tests), and build the
# benchmarks and run each one briefly as a smoke test (no timing assertions).
#
# Usage: scripts/test.sh [preset ...]      (default: dev clang asan-ubsan tsan bench)
# Environment:
#   SLUICE_JOBS                 build and CTest parallelism (default: nproc)
#   SLUICE_BENCH_SMOKE_TIMEOUT  seconds one benchmark binary's smoke run may take (default 120);
#                               past it the binary is killed (SIGKILL) and counted as a failure,
#                               so a benchmark that hangs can never stall CI
#
# A preset that fails to configure or build is counted as one failure and the next preset still
# runs; the last line is always `tests: N passed, M failed`, and the exit status is non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

presets=("$@")
[[ ${#presets[@]} -eq 0 ]] && presets=(dev clang asan-ubsan tsan bench)
jobs="${SLUICE_JOBS:-$(nproc)}"
smoke_timeout="${SLUICE_BENCH_SMOKE_TIMEOUT:-120}"

scripts/install-deps.sh

total_passed=0
total_failed=0
failures=()
timings=()
started=$SECONDS

fail() {  # fail <what>: count one failure and remember it for the summary
  echo "FAILED: $1"
  total_failed=$((total_failed + 1))
  failures+=("$1")
}

run_bench_smoke() {
  local bench name out rc t0
  for bench in build/bench/bench/*_bench; do
    name=$(basename "$bench")
    out="build/bench/$name.smoke.txt"
    echo "---- smoke: $bench (limit ${smoke_timeout} s)"
    t0=$SECONDS
    set +e
    # Line-buffered, so what a killed binary printed is in $out (it names the last benchmark done).
    timeout --signal=KILL "$smoke_timeout" stdbuf -oL -eL "$bench" --benchmark_min_time=0.01 >"$out" 2>&1
    rc=$?
    set -e
    if [[ $rc -eq 0 ]]; then
      echo "     ok in $((SECONDS - t0)) s"
      total_passed=$((total_passed + 1))
    elif [[ $rc -eq 137 || $rc -eq 124 ]]; then
      echo "     the hang came after: $(grep -E '^[A-Za-z_]+/' "$out" | tail -n 1 | cut -c1-100)"
      fail "$name hung: killed after ${smoke_timeout} s (timeout --signal=KILL); output in $out"
    else
      tail -n 30 "$out"
      fail "$name exited with status $rc; output in $out"
    fi
  done
}

for preset in "${presets[@]}"; do
  echo "==== preset: $preset ===="
  t0=$SECONDS
  configure_log=$(mktemp)
  if ! cmake --preset "$preset" >"$configure_log" 2>&1; then
    cat "$configure_log"; rm -f "$configure_log"
    fail "preset $preset: configure"; continue
  fi
  rm -f "$configure_log"
  if ! cmake --build --preset "$preset" -j "$jobs"; then
    fail "preset $preset: build"; continue
  fi
  built=$((SECONDS - t0))
  if [[ "$preset" == "bench" ]]; then
    run_bench_smoke
    timings+=("$preset $((SECONDS - t0)) s (build $built s)")
    continue
  fi
  log="build/$preset/ctest.log"
  # The snippet, package and compile-failure tests only compile (or configure) code, never with
  # the preset's sanitizer flags: under asan-ubsan (g++) and tsan (clang++) they would repeat
  # dev's and clang's runs command for command, so they run there and the sanitizer presets skip them.
  skip=()
  [[ "$preset" == asan-ubsan || "$preset" == tsan ]] && skip=(-LE '^(snippets|package|compile_fail)$')
  set +e
  ctest --preset "$preset" -j "$jobs" "${skip[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  timings+=("$preset $((SECONDS - t0)) s (build $built s)")
  summary=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$log" | tail -n 1 || true)
  if [[ -z "$summary" ]]; then
    fail "preset $preset: no CTest summary"; continue
  fi
  out_of=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$summary")
  failed=$(sed -E 's/.*tests passed, ([0-9]+) tests? failed.*/\1/' <<<"$summary")
  total_passed=$((total_passed + out_of - failed))
  total_failed=$((total_failed + failed))
  if [[ $failed -gt 0 ]]; then failures+=("preset $preset: $failed CTest test(s), see $log"); fi
  if [[ $status -ne 0 && $failed -eq 0 ]]; then fail "preset $preset: ctest exited with $status"; fi
done

echo "==== sluice: ${presets[*]} in $((SECONDS - started)) s (${timings[*]/%/;}) ===="
for f in "${failures[@]}"; do echo "  failed: $f"; done
echo "tests: $total_passed passed, $total_failed failed"
[[ $total_failed -eq 0 ]]
