#!/usr/bin/env bash
# Optional, for machines with internet access: downloads the binary versions of CIFAR-10
# and CIFAR-100 from their official location, verifies their published MD5 sums and
# unpacks them.   scripts/get-cifar.sh [DIR]   (default ~/.cache/blpa/data)
# Then: blpa-train --data-dir DIR/cifar-10-batches-bin   or   DIR/cifar-100-binary
set -euo pipefail
if (($# > 1)) || [[ ${1:-} == -* ]]; then  # --help made a folder "--help" and downloaded into it
  echo "usage: scripts/get-cifar.sh [DIR]   (default ~/.cache/blpa/data)" >&2
  exit 2
fi
dir=${1:-$HOME/.cache/blpa/data}
base=https://www.cs.toronto.edu/~kriz
mkdir -p "$dir"
fetch() {  # file md5
  local f=$1 sum=$2
  if [[ ! -f $dir/$f ]] || ! echo "$sum  $dir/$f" | md5sum -c --status; then
    echo "downloading $base/$f" >&2
    curl -fL --retry 2 -o "$dir/$f.part" "$base/$f" ||
      { rm -f "$dir/$f.part"; echo "error: could not download $base/$f (no network?). Copy the file into $dir by hand." >&2; exit 1; }
    mv "$dir/$f.part" "$dir/$f"
  fi
  echo "$sum  $dir/$f" | md5sum -c --status ||
    { echo "error: $dir/$f does not have the published MD5 $sum; delete it and retry" >&2; exit 1; }
  tar -xzf "$dir/$f" -C "$dir"
}
fetch cifar-10-binary.tar.gz c32a1d4ab5d03f1284b67883e8d87530
fetch cifar-100-binary.tar.gz 03b5dce01913d631647c71ecec9e9cb8
echo "CIFAR-10: $dir/cifar-10-batches-bin   CIFAR-100: $dir/cifar-100-binary" >&2
