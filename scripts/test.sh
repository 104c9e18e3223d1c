#!/usr/bin/env bash
# The README's test command: set-up, build, then every test through CTest.
# Fails if any test fails or if no test ran. CUDA tests are reported as skipped without a GPU.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
"$here/scripts/build.sh" "$@"
cd "$BLPA_BUILD_DIR"
ctest --output-on-failure --no-tests=error --parallel "${BLPA_TEST_JOBS:-2}"
