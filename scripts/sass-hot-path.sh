#!/usr/bin/env bash
# The instructions the CUDA pack kernels issue per element on their common path, counted in
# their SASS (sm_90) without a GPU: a measure of the kernels' work where they are bound by
# instruction issue rather than by memory (docs/results.md, "Pack's exact path and gamma").
#
#   scripts/sass-hot-path.sh [TEXT]    (default: the 4-bit packs; e.g. 'pack_kernel<8,')
#   BLPA_SASS_KEEP=DIR keeps the SASS there (k0.sass, k1.sass: without and with the ReLU).
#   BLPA_SASS_RESOURCES=1 also compiles the kernels as they are (no cuts) and lists each
#   pack, unpack and BatchNorm kernel's registers and spilled bytes (ptxas), which bound how
#   many warps an SM holds; about a minute more.
#
# It compiles a copy of cuda/codec_kernels.cu in which the rare paths are cut out. pack's
# kernels for the common path (Common: whole aligned groups, NHWC rows of 8 channels or NCHW
# groups in one channel, 32-bit index math; what runs for every layer of the networks) are
# counted as built, but for the codes' exact path (no element next to a bin edge; the group's
# test for one stays): what is left of the grid-stride loop (the loop that stores the codes) is
# then straight-line code: its instructions / 16 (two groups of 8 per turn; / 32 for the
# bf16 kernels that load 4, BLPA_PACK_UNROLL=4) are the common path's per element, with and
# without the ReLU output (relu=1, relu=0); the NHWC kernels' reads of their row's constants, once a thread before the loop, are not in it. (Before the
# Common kernels the cuts made that path of the one kernel; on an H200 that kernel executed
# about twice what they left.) Then unpack's common-path kernels, cut alike and writing r' alone
# (what the backward asks of it), and the NHWC BatchNorm backward's kernels (reduce and
# apply, 8 and 4 channels a thread), whose loops the cuts leave as they are. Each
# row also counts the instructions of three pipes, which an sm_90 SM completes at different
# rates: 128 a cycle for FP32 (64 for IMAD), 64 for the ALU (integer, logic, compares,
# selects, min/max, byte permutes, F2FP) and 16 for conversions (F2I, I2F, FRND...); with 4
# issued a cycle, the busiest of these four sets the SM cycles per 32 elements the last
# columns give, if nothing else (memory, latency) binds first.
# Needs the build folder's LibTorch (BLPA_BUILD_DIR, default build/), nvcc, python3 and
# cuobjdump with nvdisasm: from PATH, or else PyPI's nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm wheels, fetched once into ~/.cache/blpa/cuda-tools.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BLPA_BUILD_DIR:-$here/build}
filter=${1:-'pack_kernel<4,'}  # a substring of the kernels' names
torch_dir=$(sed -n 's/^Torch_DIR:[A-Z]*=//p' "$build/CMakeCache.txt" 2>/dev/null || true)
[[ -n $torch_dir ]] || { echo "sass-hot-path: no Torch_DIR in $build/CMakeCache.txt: build first" >&2; exit 1; }
torch_inc=$(cd "$torch_dir/../../../include" && pwd)
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[[ -x $nvcc ]] || { echo "sass-hot-path: nvcc not found" >&2; exit 1; }
if ! command -v cuobjdump >/dev/null || ! command -v nvdisasm >/dev/null; then
  tools=${BLPA_CACHE:-$HOME/.cache/blpa}/cuda-tools
  if ! compgen -G "$tools/nvidia/cu*/bin/nvdisasm" >/dev/null; then
    mkdir -p "$tools"
    (cd "$tools" && python3 -m pip download -q --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm &&
      for w in *.whl; do python3 -m zipfile -e "$w" .; done && chmod +x nvidia/cu*/bin/*)
  fi
  bins=("$tools"/nvidia/cu*/bin)  # the wheels' CUDA major version names the folder
  export PATH=${bins[-1]}:$PATH
fi
tmp=$(mktemp -d)
trap '[[ -z ${BLPA_SASS_KEEP:-} ]] || cp "$tmp"/k*.sass "$BLPA_SASS_KEEP"/; rm -rf "$tmp"' EXIT
cp -r "$here/cuda" "$here/lib" "$tmp/"

# Each cut names the text it replaces, and fails if that text is gone (the kernel changed:
# update the cut with it).
python3 - "$tmp/cuda" <<'EOF'
import glob, sys
files = {path: open(path).read() for path in glob.glob(sys.argv[1] + "/*.cuh")}
def cut(old, new, within=None):
    """Replaces old by new in the one kernel file that has it; within: (the first line of a
    function, whose body ends at the next closing brace in column 0) where to look."""
    found = False
    for path, s in files.items():
        if within is None:
            start, end = 0, len(s)
        elif within in s:
            start = s.index(within)
            end = s.index("\n}\n", start)
        else:
            continue
        if old in s[start:end]:
            if found:
                sys.exit("sass-hot-path: more than one file has: " + old)
            files[path] = s[:start] + s[start:end].replace(old, new) + s[end:]
            found = True
    if not found:
        sys.exit("sass-hot-path: the kernels no longer have: " + old)
# 32-bit index math only.
cut("""  if (ix.narrow) {
    const uint32_t u = static_cast<uint32_t>(n);
    return remainder(u, divide(u, ix.by_channels), ix.channels);
  }
  return n % ix.channels;""", """  const uint32_t u = static_cast<uint32_t>(n);
  return remainder(u, divide(u, ix.by_channels), ix.channels);""")
cut("""  if (ix.narrow) {
    const uint32_t e = static_cast<uint32_t>(e0), q = divide(e, ix.by_plane);
    return {channel_of(q, ix), remainder(e, q, ix.plane) + n <= static_cast<uint32_t>(ix.plane)};
  }
  const int64_t q = e0 / ix.plane;
  return {channel_of(q, ix), e0 - q * ix.plane + n <= ix.plane};""", """  const uint32_t e = static_cast<uint32_t>(e0), q = divide(e, ix.by_plane);
  return {channel_of(q, ix), remainder(e, q, ix.plane) + n <= static_cast<uint32_t>(ix.plane)};""")
# NHWC rows of channels, NCHW groups in one channel.
cut("""    if (rows) return {GroupAt::row, channel_of(e0, ix)};
    return {GroupAt::per_element, 0};""", """    return {GroupAt::row, channel_of(e0, ix)};""")
cut("""    return {gr.one_channel ? GroupAt::one_channel : GroupAt::per_element, gr.c0};""",
    """    return {GroupAt::one_channel, gr.c0};""")
# Within each kernel, given by its first line: the text and what replaces it.
for kernel, cuts in {
    # pack: its common-path kernels (Common: whole aligned groups, as built) without the exact
    # path, the ReLU output as HOT_RELU says.
    "pack_kernel(PackParams p, Index ix) {": [
        # (the group's test stays, its branch a store of one code: what the common path pays)
        ("      if (Common && near) {", "      if (Common && near) q[0] = 0;\n      if (false) {"),
        ("      if (relu) {", "      if (HOT_RELU && relu) {")],
    # unpack: its common-path kernels (as pack's), writing r' alone (as the backward asks).
    "unpack_kernel(UnpackParams p, Index ix) {": [
        ("      if (x_hat) {", "      if (false) {"),
        ("      if (p.mask) {", "      if (false) {")],
}.items():
    for old, new in cuts:
        cut(old, new, kernel)
for path, s in files.items():
    open(path, "w").write(s)
EOF

flags=(-isystem="$torch_inc" -isystem="$torch_inc/torch/csrc/api/include" --expt-relaxed-constexpr
  --expt-extended-lambda -O3 -DNDEBUG -gencode arch=compute_90,code=sm_90 --fmad=false -std=c++20 -cubin)
if [[ ${BLPA_SASS_RESOURCES:-0} == 1 ]] &&
  ! "$nvcc" -I"$here/cuda" -I"$here/lib" "${flags[@]}" -Xptxas -v -o "$tmp/resources.cubin" \
    -x cu "$here/cuda/codec_kernels.cu" >"$tmp/resources.txt" 2>&1; then
  cat "$tmp/resources.txt" >&2
  exit 1
fi
for relu in 0 1; do
  "$nvcc" -DHOT_RELU=$relu -I"$tmp/cuda" -I"$tmp/lib" \
    "${flags[@]}" -o "$tmp/k$relu.cubin" -x cu "$tmp/cuda/codec_kernels.cu" 2> >(grep -v -i warning >&2)
  cuobjdump -sass "$tmp/k$relu.cubin" >"$tmp/k$relu.sass"
done
python3 - "$tmp" "$filter" <<'EOF'
import collections, re, subprocess, sys
tmp, want = sys.argv[1], sys.argv[2]


def kernels(sass):
    """(demangled name, [(address, instruction)]) of each function in a SASS listing."""
    for f in re.split(r"\n\s+Function : ", open(sass).read())[1:]:
        name = subprocess.run(["c++filt"], input=f.split("\n", 1)[0].strip(), capture_output=True,
                              text=True).stdout.strip()
        yield name, [(int(m.group(1), 16), m.group(2).strip()) for m in
                     re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", f)]


def widest_loop(ins, storing):
    """The instructions of the widest loop (a backward branch's span); storing: one that stores
    to global memory (a grid-stride loop, not a table's)."""
    loops = [(int(b.group(1), 16), a) for a, t in ins for b in [re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)]
             if b and int(b.group(1), 16) < a]
    if storing:
        loops = [l for l in loops if any(l[0] <= a <= l[1] and "STG" in t for a, t in ins)]
    start, end = max(loops, key=lambda l: l[1] - l[0])
    return [t for a, t in ins if start <= a <= end]


def short(types):
    return types.replace("c10::BFloat16", "bf16")


# Where an instruction runs, and how many an SM completes a cycle (sm_90: four partitions,
# each with 32 lanes of FP32 (FMA heavy and lite), 16 of ALU, 4 of conversions (XU); IMAD on
# the heavy half alone). Loads, stores, branches and uniform instructions only take an issue.
RATE = {"alu": 64, "fma": 128, "imad": 64, "xu": 16}
XU = {"F2I", "I2F", "FRND", "F2F", "I2FP", "MUFU"}
FMA = {"FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2"}
OTHER = {"LDG", "STG", "LD", "ST", "LDS", "STS", "LDC", "ULDC", "BRA", "BSSY", "BSYNC", "EXIT", "NOP",
         "CS2R", "S2R", "S2UR", "R2UR", "UMOV", "ULOP3", "UIADD3", "USHF", "ULEA", "MOV", "SHFL", "BAR",
         "DADD", "DFMA", "DMUL"}


def pipe(op):
    if op in XU:
        return "xu"
    if op in FMA:
        return "fma"
    if op.startswith("IMAD") or op in ("IMUL", "VIADD", "IDP"):
        return "imad"
    return "other" if op in OTHER else "alu"  # integer, logic, compares, selects, F2FP, PRMT


HEADER = "instr/elem    alu    fma   conv  SM cycles/32 elements, bound by"


def columns(body, per):
    """Instructions per element, those of the ALU, FMA (IMAD included) and conversion pipes, and
    the SM cycles 32 elements take on the busiest of them or on issue (4 instructions a cycle)."""
    ops = collections.Counter(pipe(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]) for t in body)
    cycles = {"issue": len(body) * 32 / 128}
    cycles.update({k: ops[k] * 32 / RATE[k] for k in ("alu", "xu")})
    cycles["fma"] = (ops["fma"] / RATE["fma"] + ops["imad"] / RATE["imad"]) * 32
    bound = max(cycles, key=cycles.get)
    return (f"{len(body) / per:10.1f} {ops['alu'] / per:6.1f} {(ops['fma'] + ops['imad']) / per:6.1f} "
            f"{ops['xu'] / per:6.2f}  {cycles[bound] / per:6.2f} {bound}")


print(f"pack_kernel<bits, dtype, NHWC, fused>            relu  {HEADER}")
for relu in (0, 1):
    for name, ins in kernels(f"{tmp}/k{relu}.sass"):
        # the common path's kernels, and the groups of 8 a thread loads a turn (Unroll)
        m = re.search(r"(?<!un)pack_kernel<([^>]*), true, (\d+)>", name)
        if not m or want not in name:
            continue
        body = widest_loop(ins, storing=True)
        unroll = int(m.group(2))
        label = short(m.group(1)) + ("" if unroll == 2 else f" ({unroll} a turn)")
        print(f"{label:48s} {relu:4d}  {columns(body, 8 * unroll)}")
# unpack of r' alone (its common path, cut as above): 4 groups of 16 bytes of output a turn.
print(f"\nunpack_kernel<bits, dtype, NHWC>, r' only              {HEADER}")
for name, ins in kernels(f"{tmp}/k0.sass"):
    m = re.search(r"unpack_kernel<([^>]*), true>", name)  # the common path's kernels
    if m:
        per_turn = 4 * (8 if "BFloat16" in m.group(1) else 4)
        print(f"{short(m.group(1)):48s}       {columns(widest_loop(ins, storing=True), per_turn)}")
# The NHWC BatchNorm backward (untouched by the cuts): 4 rows of V channels a turn (V = 8, or
# 4 with BLPA_BN_NHWC_VECTOR=4).
print(f"\nbn_nhwc_<kernel><bits, dtype, channels a thread>      {HEADER}")
for name, ins in kernels(f"{tmp}/k0.sass"):
    m = re.search(r"bn_nhwc_(reduce|apply)_kernel<(\d+, [\w:]+, ([48]))>", name)
    if m:
        per_turn = 4 * int(m.group(3))
        print(f"{m.group(1) + '<' + short(m.group(2)) + '>':48s}       {columns(widest_loop(ins, storing=False), per_turn)}")

# ptxas's resources of the kernels as they are (BLPA_SASS_RESOURCES=1).
try:
    ptxas = open(f"{tmp}/resources.txt").read()
except FileNotFoundError:
    sys.exit(0)
print(f"\n{'kernel (as built, no cuts)':70s} registers  spill stores  spill loads")
name, spills = None, None
for line in ptxas.splitlines():
    m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        name = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
        name = short(re.sub(r"\(.*", "", name.replace("blpa::cuda::(anonymous namespace)::", "")))
        spills = None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spills = m.groups()
    m = re.search(r"Used (\d+) registers", line)
    if m and name and spills and re.search(r"pack_kernel|unpack_kernel|bn_", name):
        print(f"{name.removeprefix('void '):70s} {int(m.group(1)):9d} {spills[0]:>13s} {spills[1]:>12s}")
EOF
