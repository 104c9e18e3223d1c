#!/usr/bin/env bash
# Run here (with Debian's registry): downloads the Debian packages that a GPU machine without
# any registry needs (cxxopts, spdlog, fmt, Catch2) and unpacks them into third_party/prefix
# (git-ignored). Carry that folder to the GPU machine; scripts/gpu-check.sh uses it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=$here/third_party/prefix
pkgs=(libcxxopts-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 catch2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${pkgs[@]}" >/dev/null)
rm -rf "$prefix"
mkdir -p "$prefix"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
# Debian's CMake configs live under lib/x86_64-linux-gnu; they locate themselves relative to
# their own path, so the prefix works wherever it is unpacked.
echo "unpacked ${#pkgs[@]} packages into $prefix ($(du -sh "$prefix" | cut -f1))"
