#!/usr/bin/env bash
# Fuzzes every parser: builds the fuzz targets of tests/fuzz/ with clang's libFuzzer, ASan and
# UBSan in build-fuzz/ (BLPA_FUZZ_BUILD_DIR), then runs each for SECONDS (default 60) under
# nice -n 10, starting from its committed corpus tests/fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      e.g. scripts/fuzz.sh 600, scripts/fuzz.sh 30 jpeg idx
#
# Inputs that add coverage go to build-fuzz/fuzz-corpus/<target>/ (kept between runs, never
# committed as is); an input that crashes, leaks, hangs or trips a sanitizer or a FUZZ_CHECK is
# saved in build-fuzz/fuzz-crashes/<target>/. Prints per target the executions and libFuzzer's
# coverage (edges reached / instrumented, features), then the line coverage of each of our
# source files that the targets' corpora reach together (llvm-cov; build-fuzz/fuzz-lines.txt
# has the full report). Fails if any target found something. clang, libFuzzer, OpenMP and
# llvm-cov come from Debian (clang-19, libclang-rt-19-dev, libomp-19-dev, llvm-19), installed
# here if missing. The first build of the checkpoint or command-line target compiles the
# LibTorch-using code with clang: slow. Only the targets named are built.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (the targets: tests/fuzz/corpus/*)" >&2; exit "$1"; }
[[ ${1:-} != -h && ${1:-} != --help ]] || usage 0
seconds=60
# SECONDS may be left out before targets ("scripts/fuzz.sh jpeg" was refused as a bad SECONDS).
if [[ ${1:-} =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi
[[ $seconds =~ ^[1-9][0-9]*$ ]] || usage 2
build=${BLPA_FUZZ_BUILD_DIR:-$here/build-fuzz}
if (($#)); then targets=("$@"); else
  targets=()
  for d in "$here"/tests/fuzz/corpus/*/; do targets+=("$(basename "$d")"); done
fi
say() { echo "[fuzz] $*" >&2; }
for t in "${targets[@]}"; do
  [[ $t =~ ^[a-z0-9_]+$ && -d $here/tests/fuzz/corpus/$t ]] ||  # not "", "." or "..": folders, not targets
    { say "error: no fuzz target '$t' (the targets: tests/fuzz/corpus/*)"; exit 2; }
done

# --- clang with libFuzzer -----------------------------------------------------------------
# clang 19, the newest of Debian 12: bookworm's default clang 14 cannot compile lib/unit.cpp
# (a lambda that captures structured bindings, C++20, needs clang >= 16).
llvm=${BLPA_FUZZ_LLVM:-19}
clangxx=clang++-$llvm llvm_cov=llvm-cov-$llvm profdata=llvm-profdata-$llvm
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
libfuzzer_links() {
  echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe/p.cpp"
  "$clangxx" -fsanitize=fuzzer,address,undefined "$probe/p.cpp" -o "$probe/p" >/dev/null 2>&1
}
openmp_links() {  # the project's CMake asks for OpenMP (lib/: the CPU codec's loops)
  echo 'int main() { return 0; }' >"$probe/o.cpp"
  "$clangxx" -fopenmp "$probe/o.cpp" -o "$probe/o" >/dev/null 2>&1
}
if ! command -v "$clangxx" >/dev/null || ! libfuzzer_links || ! openmp_links || ! command -v "$llvm_cov" >/dev/null ||
  ! command -v "$profdata" >/dev/null; then
  say "installing clang $llvm, libFuzzer, OpenMP and llvm-cov from Debian"
  sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "clang-$llvm" \
    "libclang-rt-$llvm-dev" "libomp-$llvm-dev" "llvm-$llvm" >/dev/null
  libfuzzer_links || { say "error: $clangxx -fsanitize=fuzzer still does not link"; exit 1; }
  openmp_links || { say "error: $clangxx -fopenmp still does not link"; exit 1; }
fi

# --- build ----------------------------------------------------------------------------------
# LibTorch is configured as in every build (the project's CMake needs it), but the targets
# link only what they parse with. Everything they link is instrumented: coverage for libFuzzer,
# ASan, UBSan with no recovery (so that a report is a crash libFuzzer records), and clang's
# source-based coverage for the line counts.
# Configure-time checks run programs built with these flags: no profiles from them.
export LLVM_PROFILE_FILE=/dev/null
BLPA_BUILD_DIR=$build BLPA_CUDA=OFF "$here/scripts/setup.sh"
# shellcheck disable=SC1091
source "$build/setup.env"
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
flags+=" -fprofile-instr-generate -fcoverage-mapping"
# A build dir configured with another compiler starts afresh.
compiler=$(command -v "$clangxx")
if [[ -f $build/CMakeCache.txt ]] && ! grep -qx "CMAKE_CXX_COMPILER:[A-Z]*=$compiler" "$build/CMakeCache.txt"; then
  rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"
fi
gen=()
[[ -f $build/CMakeCache.txt ]] || gen=(-G Ninja)
say "configuring in $build"
cmake -S "$here" -B "$build" "${gen[@]}" -DCMAKE_C_COMPILER="clang-$llvm" -DCMAKE_CXX_COMPILER="$compiler" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" -DBLPA_CUDA=OFF -DBLPA_FUZZ=ON \
  -DTorch_DIR="$Torch_DIR" >"$build/configure.log" 2>&1 || { cat "$build/configure.log" >&2; exit 1; }
say "compiling"
build_targets=()
for t in "${targets[@]}"; do build_targets+=("fuzz_$t"); done  # only those asked for
nice -n 10 cmake --build "$build" --target "${build_targets[@]}" --parallel "${BLPA_JOBS:-$(nproc)}"

# --- run ------------------------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# Leaks of code that is not ours (LibTorch's miniz), each with its reason, as in the sanitized suite.
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$here/tests/sanitizers/lsan.supp:print_suppressions=0}
found=0 total=0
stamp=$build/fuzz-start
touch "$stamp"
row() { printf '%-13s %11s %7s %10s %6s %7s  %s' "$@"; }
summary=$(row target executions exec/s edges ft corpus findings)
profiles=() objects=()
for t in "${targets[@]}"; do
  exe=$build/tests/fuzz/fuzz_$t
  [[ -x $exe ]] || { say "error: no fuzz target '$t' (the targets: tests/fuzz/corpus/*)"; exit 2; }
  corpus=$build/fuzz-corpus/$t crashes=$build/fuzz-crashes/$t log=$build/fuzz-$t.log
  mkdir -p "$corpus" "$crashes"
  say "$t: ${seconds}s (log: $log)"
  # -rss_limit_mb: a JPEG may declare up to kMaxJpegPixels (2^28) pixels, and decoding one
  # takes GBs (its output buffer alone is 768 MB); -timeout: seconds for one input.
  nice -n 10 "$exe" -max_total_time="$seconds" -print_final_stats=1 \
    -rss_limit_mb=4096 -timeout=60 -artifact_prefix="$crashes/" "$corpus" "$here/tests/fuzz/corpus/$t" \
    >"$log" 2>&1 || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+.* cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  edges=$(sed -n 's/^INFO: Loaded 1 modules *(\([0-9]*\) inline 8-bit counters).*/\1/p' "$log" | head -n 1)
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  findings=$(find "$crashes" -type f -newer "$stamp" \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
    -o -name 'oom-*' \) | wc -l)
  if grep -qE '^SUMMARY: |fuzz check failed|^==[0-9]+== ?ERROR' "$log"; then findings=$((findings > 0 ? findings : 1)); fi
  # For the line coverage: the whole corpus once more, profiled.
  rm -f "$build/fuzz-$t.profraw"
  LLVM_PROFILE_FILE=$build/fuzz-$t.profraw "$exe" -runs=0 -rss_limit_mb=4096 "$corpus" \
    "$here/tests/fuzz/corpus/$t" >/dev/null 2>&1 || true
  [[ -s $build/fuzz-$t.profraw ]] && profiles+=("$build/fuzz-$t.profraw") objects+=(-object "$exe")
  found=$((found + findings)) total=$((total + ${execs:-0}))
  summary+=$'\n'$(row "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}/${edges:-?}" "${ft:-?}" "${corp:-?}" "$findings")
done
echo "$summary"
echo "total executions: $total; findings: $found (inputs in $build/fuzz-crashes/)"
if ((${#profiles[@]})) && "$profdata" merge -sparse "${profiles[@]}" -o "$build/fuzz.profdata"; then
  "$llvm_cov" report -instr-profile="$build/fuzz.profdata" "${objects[@]:1}" >"$build/fuzz-lines.txt" ||
    say "error: llvm-cov failed, no line coverage"
  echo "lines of our code that the corpora reach (llvm-cov):"
  # llvm-cov names files without the prefix they share: the repository's, or / when LibTorch's
  # headers are among them.
  awk -v here="${here#/}/" '{ f = $1; sub("^/", "", f); if (index(f, here) == 1) f = substr(f, length(here) + 1) }
       f ~ /^(app|data|lib)\/[^\/]*\.cpp$/ { printf "  %-24s %5d of %5d  %s\n", f, $8 - $9, $8, $10 }' \
    "$build/fuzz-lines.txt"
fi
((found == 0))
