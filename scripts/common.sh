#!/usr/bin/env bash
# Shared by scripts/test and scripts/demo: install what is missing from Debian's packages, find
# LibTorch (a CUDA build when one is present), configure and build in build/.
set -euo pipefail
MPU_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MPU_BUILD_DIR=${MPU_BUILD_DIR:-$MPU_ROOT/build}

mpu_say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Which LibTorch: Torch_DIR, then CMAKE_PREFIX_PATH, then the torch Python package; Debian's
# CPU-only libtorch-dev otherwise.
mpu_find_torch() {
  MPU_TORCH_PREFIX=""
  if [ -n "${Torch_DIR:-}" ]; then
    MPU_TORCH_PREFIX="$Torch_DIR"
  elif [ -n "${CMAKE_PREFIX_PATH:-}" ] && find ${CMAKE_PREFIX_PATH//:/ } -maxdepth 4 -name TorchConfig.cmake 2>/dev/null | grep -q .; then
    MPU_TORCH_PREFIX="(from CMAKE_PREFIX_PATH)"
  elif command -v python3 >/dev/null && python3 -c 'import torch' >/dev/null 2>&1; then
    local p
    p=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
    export CMAKE_PREFIX_PATH="$p${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
    MPU_TORCH_PREFIX="$p (python3 torch $(python3 -c 'import torch; print(torch.__version__)'))"
  fi
}

mpu_install_deps() {
  local pkgs=(cmake ninja-build g++ catch2 libgloo-dev nlohmann-json3-dev libcli11-dev zlib1g-dev
              dataset-fashion-mnist libbenchmark-dev gnuplot-nox "$@")
  [ -z "$MPU_TORCH_PREFIX" ] && pkgs+=(libtorch-dev)
  pkgs+=(doxygen)  # ctest docs.doxygen: the API reference must build without warnings
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "error: missing packages ${missing[*]}, and this is not a Debian/Ubuntu system; install them by hand" >&2
    exit 1
  fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  mpu_say "installing from Debian's packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

mpu_build() {
  local jobs
  jobs=$(nproc)
  mpu_say "configuring in $MPU_BUILD_DIR (LibTorch: ${MPU_TORCH_PREFIX:-Debian libtorch-dev})"
  cmake -S "$MPU_ROOT" -B "$MPU_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${Torch_DIR:+-DTorch_DIR=$Torch_DIR} "$@"
  mpu_say "building with $jobs jobs"
  cmake --build "$MPU_BUILD_DIR" --parallel "$jobs"
}
