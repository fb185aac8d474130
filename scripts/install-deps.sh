#!/usr/bin/env bash
# Installs the Debian packages sluice's build, tests and benchmarks need — only those missing.
# Usage: scripts/install-deps.sh [--minimal]
#   --minimal   only what building and running the examples needs (compiler, CMake, Ninja, and
#               the examples' libraries: SQLite, libpq, CLI11, prometheus-cpp)
# SLUICE_APT_UPDATED=1 skips `apt-get update` (.ci/run updates the package lists once itself).
set -euo pipefail

packages=(g++ cmake ninja-build python3)
# The examples' libraries: configuring any example configures them all (examples/CMakeLists.txt),
# so the write-behind example's libpq is needed even to run the flagship (examples/operator.cpp).
packages+=(libsqlite3-dev libpq-dev libcli11-dev prometheus-cpp-dev)
if [[ "${1:-}" != "--minimal" ]]; then
  packages+=(clang libclang-rt-14-dev catch2 libbenchmark-dev libtbb-dev libconcurrentqueue-dev libboost-dev)
  # The examples' end-to-end tests: a throwaway PostgreSQL server, the metrics scrape over HTTP.
  packages+=(postgresql-15 curl)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "sluice: installing missing Debian packages: ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
if [[ "${SLUICE_APT_UPDATED:-0}" != 1 ]]; then
  $sudo apt-get update -qq
fi
# A mirror hiccup should not fail CI: retry the install a few times before giving up.
for attempt in 1 2 3; do
  if $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then exit 0; fi
  echo "sluice: apt-get install failed (attempt $attempt of 3)" >&2
  sleep $((attempt * 5))
  $sudo apt-get update -qq || true
done
echo "sluice: could not install: ${missing[*]}" >&2
exit 1
