#!/usr/bin/env bash
# Run here (with Debian's registry): downloads the Debian packages that a GPU machine without
# any registry needs (cxxopts, spdlog, fmt, Catch2, zlib, libjpeg-turbo, Gloo's headers, and the Fashion-MNIST
# data set the tests and the trainer's default job use) and unpacks them into
# third_party/prefix (git-ignored, about 40 MB). Carry that folder to the GPU machine;
# scripts/gpu-check.sh uses it.
set -euo pipefail
# It takes no arguments (--help did the whole job, the old prefix removed first).
(($# == 0)) || { echo "usage: scripts/prepare-offline-deps.sh   (no arguments; see its header)" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=$here/third_party/prefix
pkgs=(libcxxopts-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 catch2 zlib1g-dev zlib1g
      libturbojpeg0-dev libturbojpeg0 libgloo-dev dataset-fashion-mnist)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${pkgs[@]}" >/dev/null)
rm -rf "$prefix"
mkdir -p "$prefix"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
# Absolute links (libz.so -> /lib/...libz.so.1.2.13) would point outside the prefix there:
# make each one relative, to its target inside the prefix.
find "$prefix" -type l -lname '/*' | while read -r link; do
  ln -sfr "$prefix$(readlink "$link")" "$link"
done
# Debian's CMake configs live under lib/x86_64-linux-gnu; they locate themselves relative to
# their own path, so the prefix works wherever it is unpacked.
echo "unpacked ${#pkgs[@]} packages into $prefix ($(du -sh "$prefix" | cut -f1))"
