#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then configure and build blpa in $BLPA_BUILD_DIR (default build/).
# Extra arguments go to CMake's configure step, e.g. -DBLPA_CUDA=OFF.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
"$here/scripts/setup.sh"
# shellcheck disable=SC1091
source "$BLPA_BUILD_DIR/setup.env"

cuda_args=(-DBLPA_CUDA="${BLPA_CUDA:-AUTO}")
if [[ -n $CUDACXX ]]; then
  cuda_args+=(-DCMAKE_CUDA_COMPILER="$CUDACXX")
  export PATH="$(dirname "$CUDACXX"):$PATH"  # FindCUDAToolkit (run by LibTorch's config) looks for nvcc on PATH
elif [[ ${BLPA_CUDA:-AUTO} != ON ]]; then
  cuda_args=(-DBLPA_CUDA=OFF)
fi
prefix_args=()
if [[ -n ${BLPA_PREFIX:-} ]]; then prefix_args=(-DCMAKE_PREFIX_PATH="$BLPA_PREFIX"); fi

gen=()
[[ -f $BLPA_BUILD_DIR/CMakeCache.txt ]] || gen=(-G Ninja)
echo "[build] configuring in $BLPA_BUILD_DIR" >&2
cmake -S "$here" -B "$BLPA_BUILD_DIR" "${gen[@]}" -DTorch_DIR="$Torch_DIR" "${cuda_args[@]}" \
  "${prefix_args[@]}" "$@" >"$BLPA_BUILD_DIR/configure.log" 2>&1 ||
  { cat "$BLPA_BUILD_DIR/configure.log" >&2; exit 1; }
grep '^-- blpa' "$BLPA_BUILD_DIR/configure.log" >&2 || true
echo "[build] compiling" >&2
cmake --build "$BLPA_BUILD_DIR" --parallel "${BLPA_JOBS:-$(nproc)}"
