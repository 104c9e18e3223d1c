#!/usr/bin/env bash
# The README's test command: set-up, build, then every test through CTest.
# Fails if any test fails or if no test ran. CUDA tests are reported as skipped without a GPU.
#
# --sanitize (or BLPA_SANITIZE=1): the same suite built with AddressSanitizer and
# UndefinedBehaviorSanitizer, in build-asan/ unless BLPA_BUILD_DIR says otherwise, CUDA off.
# Any report fails its test. LibTorch's libraries are not instrumented; the few reports that
# come from them are suppressed by tests/sanitizers/, each with its reason.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sanitize=${BLPA_SANITIZE:-0}
if [[ ${1:-} == --sanitize ]]; then
  sanitize=1
  shift
fi
if [[ $sanitize == 1 ]]; then
  export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build-asan} BLPA_CUDA=OFF
  set -- -DBLPA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
  supp=$here/tests/sanitizers
  export ASAN_OPTIONS=$(grep -v '^#' "$supp/asan.options" | paste -sd: -)
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:suppressions=$supp/ubsan.supp
  export LSAN_OPTIONS=suppressions=$supp/lsan.supp:print_suppressions=0
fi
export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
"$here/scripts/build.sh" "$@"
cd "$BLPA_BUILD_DIR"
ctest --output-on-failure --no-tests=error --parallel "${BLPA_TEST_JOBS:-2}"
