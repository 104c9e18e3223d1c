#!/usr/bin/env bash
# Installs what blpa needs and is missing, and nothing else; safe to run any number of times.
# Downloads are cached outside the clone (BLPA_CACHE, default ~/.cache/blpa), so a second
# run takes seconds. Writes the resolved configuration to $BLPA_BUILD_DIR/setup.env.
#
# LibTorch, first match wins:
#   Torch_DIR=/path/share/cmake/Torch   a LibTorch you already have (the official zip:
#                                       LIBTORCH=/path/to/libtorch does the same)
#   BLPA_TORCH_PYTHON=python3           the torch of an existing Python installation
#   (default)                           torch==$TORCH_VERSION from PyPI into $BLPA_CACHE
# CUDA: the kernels need nvcc of the same major version as LibTorch's CUDA. The system
# toolkit is used when it matches; otherwise the matching nvcc comes from PyPI.
# BLPA_CUDA=OFF skips all of that; BLPA_OFFLINE=1 installs nothing (GPU check machines).
set -euo pipefail

TORCH_VERSION=2.15.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BLPA_CACHE=${BLPA_CACHE:-$HOME/.cache/blpa}
BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
BLPA_CUDA=${BLPA_CUDA:-AUTO}
BLPA_OFFLINE=${BLPA_OFFLINE:-0}
say() { echo "[setup] $*" >&2; }
die() { echo "[setup] error: $*" >&2; exit 1; }

# --- Debian packages -------------------------------------------------------------------
# cxxopts, spdlog+fmt, Catch2 (v2), libjpeg-turbo, zlib; the Fashion-MNIST data set the
# default job trains on; ccache and ninja keep rebuilds fast; gnuplot draws scripts/plot.sh's
# plots; pip for LibTorch.
apt_packages=(cmake g++ ninja-build ccache pkg-config libcxxopts-dev libspdlog-dev libfmt-dev catch2
              libturbojpeg0-dev zlib1g-dev libgloo-dev dataset-fashion-mnist gnuplot-nox)
# python3-pip only where no pip is usable (pyenv and similar bring their own).
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
if [[ $BLPA_OFFLINE != 1 ]]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo=""
    [[ $(id -u) == 0 ]] || sudo=sudo
    command -v apt-get >/dev/null || die "apt-get not found; install these yourself: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- LibTorch ---------------------------------------------------------------------------
if [[ -n ${LIBTORCH:-} && -z ${Torch_DIR:-} ]]; then Torch_DIR=$LIBTORCH/share/cmake/Torch; fi
if [[ -n ${Torch_DIR:-} ]]; then
  [[ -f $Torch_DIR/TorchConfig.cmake ]] || die "Torch_DIR=$Torch_DIR has no TorchConfig.cmake"
  say "LibTorch from Torch_DIR=$Torch_DIR"
elif [[ -n ${BLPA_TORCH_PYTHON:-} ]]; then
  Torch_DIR=$("$BLPA_TORCH_PYTHON" -c 'import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))') ||
    die "$BLPA_TORCH_PYTHON cannot import torch"
  say "LibTorch from $BLPA_TORCH_PYTHON: $Torch_DIR"
else
  site=$BLPA_CACHE/torch-$TORCH_VERSION
  if [[ ! -f $site/.complete ]]; then
    [[ $BLPA_OFFLINE != 1 ]] || die "BLPA_OFFLINE=1 and no LibTorch: set Torch_DIR or BLPA_TORCH_PYTHON"
    say "installing torch==$TORCH_VERSION from PyPI into $site (LibTorch and its CUDA libraries; one time)"
    rm -rf "$site"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$site" "torch==$TORCH_VERSION"
    touch "$site/.complete"
  fi
  Torch_DIR=$site/torch/share/cmake/Torch
  say "LibTorch $TORCH_VERSION from $site"
fi
torch_root=$(cd "$Torch_DIR/../../.." && pwd)
torch_cuda=""
if [[ -f $torch_root/version.py ]]; then
  torch_cuda=$(sed -n "s/^cuda[^=]*= *'\([0-9.]*\)'.*/\1/p" "$torch_root/version.py")
elif [[ -f $torch_root/build-version ]]; then
  torch_cuda=$(sed -n 's/.*+cu\([0-9]*\)\([0-9]\)$/\1.\2/p' "$torch_root/build-version")
fi

# --- CUDA toolkit matching LibTorch -----------------------------------------------------
CUDACXX=${CUDACXX:-}
if [[ $BLPA_CUDA != OFF && -n $torch_cuda ]]; then
  want=${torch_cuda%%.*}
  nvcc_major() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p'; }
  if [[ -z $CUDACXX ]]; then
    for c in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
      if [[ -n $c && -x $c && $(nvcc_major "$c") == "$want" ]]; then CUDACXX=$c; break; fi
    done
  fi
  if [[ -z $CUDACXX && $BLPA_OFFLINE != 1 ]]; then
    pypi_nvcc=$BLPA_CACHE/nvcc-$torch_cuda
    if [[ ! -f $pypi_nvcc/.complete ]]; then
      pkg="nvidia-cuda-nvcc==$torch_cuda.*"
      ((want >= 13)) || pkg="nvidia-cuda-nvcc-cu$want==$torch_cuda.*"
      say "no nvcc $want.x on this machine; installing $pkg from PyPI"
      if python3 -m pip install --quiet --disable-pip-version-check --target "$pypi_nvcc" "$pkg"; then
        touch "$pypi_nvcc/.complete"
      fi
    fi
    CUDACXX=$(find "$pypi_nvcc" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1 || true)
  fi
  if [[ -n $CUDACXX ]]; then
    say "CUDA: LibTorch built with $torch_cuda, nvcc $(nvcc_major "$CUDACXX").x at $CUDACXX"
  elif [[ $BLPA_CUDA == ON ]]; then
    die "BLPA_CUDA=ON but no nvcc $want.x (LibTorch's CUDA is $torch_cuda) could be found or installed"
  else
    say "CUDA: no nvcc $want.x found; the CUDA kernels will not be built"
  fi
elif [[ -z $torch_cuda ]]; then
  say "CUDA: LibTorch has no CUDA; CPU only"
fi

mkdir -p "$BLPA_BUILD_DIR"
# Quoted for `source`: a path with a space (or a shell character) broke every build.
printf 'Torch_DIR=%q\nCUDACXX=%q\nBLPA_TORCH_CUDA=%q\n' "$Torch_DIR" "$CUDACXX" "$torch_cuda" >"$BLPA_BUILD_DIR/setup.env"
