#!/usr/bin/env bash
# Installs the Debian packages sluice's build, tests and benchmarks need — only those missing.
# Usage: scripts/install-deps.sh [--minimal]
#   --minimal   only what building and running the examples needs (compiler, CMake, Ninja)
set -euo pipefail

packages=(g++ cmake ninja-build python3)
if [[ "${1:-}" != "--minimal" ]]; then
  packages+=(clang libclang-rt-14-dev catch2 libbenchmark-dev libtbb-dev libconcurrentqueue-dev libboost-dev)
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
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
