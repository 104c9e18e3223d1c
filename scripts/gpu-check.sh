#!/usr/bin/env bash
# For a machine with an NVIDIA GPU and PyTorch, but no package registry: builds blpa with
# BLPA_CUDA=ON against that PyTorch, runs every test (CUDA ones included, none may skip),
# the GPU benchmarks and two short CUDA training runs. Writes to $OUT (default results/):
#   gpu-check.txt        everything, with date, GPU, driver, torch and commit
#   gpu-bench.jsonl      the benchmarks' JSON objects, one per line
#   gpu-train-*.jsonl    the training logs (ResNet-20 on Fashion-MNIST, plain and blpa-4)
#   gpu-imagenet.jsonl   ResNet-50 on a generated ImageNet-layout tree (the JPEG pipeline on CUDA)
#   gpu-predict.jsonl    blpa-predict's output on CUDA for one class folder of that tree
#   traces.tgz           Chrome traces of one ResNet-164 step per mode, batch 16 and 128
#   gpu-train-blpa-graphed.jsonl, gpu-gloo-2proc.jsonl   a CUDA-graphed run; two ranks on one GPU
#   gpu-train-bf16.jsonl a blpa-4 run in bf16 channels-last
# Needs third_party/prefix from scripts/prepare-offline-deps.sh. A failing stage is reported
# and the later stages still run; the exit status is 1 if any stage failed.
# BLPA_GPU_STAGES=REGEX runs only the stages whose names match (the build always runs);
# BLPA_GPU_TESTS=REGEX only the tests whose names match; BLPA_GPU_CHECK_DATA=1 adds the
# CPU data-pipeline benchmark. All stages take longer than one device call (10 minutes); a
# session's 15 minutes hold the build, the GPU tests and a few stages, e.g.:
#   BLPA_GPU_TESTS='^(CUDA|graphs):' BLPA_GPU_STAGES='tests|step-graphs|train-graphed|gloo-cuda-2proc'
#   BLPA_GPU_TESTS='^(CUDA|graphs):' BLPA_GPU_STAGES='tests|step-precision|codec-precision|step-fused|step-precision-profile'
#   BLPA_GPU_TESTS='^(CUDA|graphs):' BLPA_GPU_STAGES='tests|codec-unroll|codec-precision|step-fused'
#   BLPA_GPU_STAGES='ncu-codec|bn-vector'     (a second call, if time is left)
# with BLPA_COMMIT=$(git rev-parse HEAD) (the tree may travel without .git). On 2026-12-04 the
# second line took 386 s (build 177 s, the CUDA tests 77 s, step-precision 40 s,
# codec-precision 36 s, step-precision-profile 14 s, step-fused 33 s), and
# 'tests|ncu-codec|bn-grid' with two tests 361 s (build 155 s, ncu-codec 126 s, bn-grid 57 s);
# a machine's start adds half a minute to a minute, and a second call a build of its own
# (the machine goes back 30 s after a call). Left to measure for #15: the third line (about
# 400 s by those figures: codec-precision and step-fused the defaults with pack's and unpack's
# common-path kernels, split after that run, and with the pack's codes made without
# conversions, tested once a group and rounded to nearest from a bias with the 1/2 in it, and
# NHWC rows' constants read once a thread, also since; codec-unroll the bf16 pack loading 4
# groups a thread against 2), then the fourth in a second call (about 400 s: ncu-codec with
# its 128M-element run and stall reasons, added since, and bn-vector, the NHWC BatchNorm
# backward with 4 channels a thread); codec-common (the common-path kernels against the
# general ones) if time is left. docs/results.md's 2026-12-04 tables are what to compare
# with.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
out=${OUT:-$here/results}
mkdir -p "$out"
log=$out/gpu-check.txt bench_log=$out/gpu-bench.jsonl
prefix=$here/third_party/prefix
[[ -d $prefix/usr ]] || { echo "third_party/prefix missing: run scripts/prepare-offline-deps.sh where a registry is reachable" >&2; exit 1; }
# A stage filter that names no stage (a typo, a bad regex) ran the build alone and said "status: 0":
# a device call spent. The stage names, from the stage calls below.
if [[ -n ${BLPA_GPU_STAGES:-} ]]; then
  stages="$(sed -n 's/^ *stage \([a-z0-9-]*\) .*/\1/p' "${BASH_SOURCE[0]}") train-plain train-blpa"
  stages+=" max-batch-resnet152-11g-accum1 max-batch-resnet152-11g-accum4 max-batch-resnet152-80g-accum1"
  stages+=" max-batch-resnet152-80g-accum4 data"  # the names made in loops below, and BLPA_GPU_CHECK_DATA's
  matched=0
  for name in $stages; do
    [[ $name =~ ^(${BLPA_GPU_STAGES})$ ]]
    case $? in 0) matched=1 ;; 2) echo "BLPA_GPU_STAGES='$BLPA_GPU_STAGES' is not a valid regular expression" >&2; exit 2 ;; esac
  done
  ((matched)) || { echo "BLPA_GPU_STAGES='$BLPA_GPU_STAGES' names no stage; the stages:" $stages >&2; exit 2; }
fi
: >"$log"  # the previous run's outputs are replaced only by a run that can start
: >"$bench_log"
export BLPA_OFFLINE=1 BLPA_CUDA=ON BLPA_TORCH_PYTHON=${BLPA_TORCH_PYTHON:-python3}
export BLPA_PREFIX=$prefix/usr BLPA_BUILD_DIR=$here/build-gpu
export LD_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu:$prefix/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
status=0
# BLPA_GPU_STAGES=REGEX runs only the stages whose names match (the build always runs).
wanted() { [[ -z ${BLPA_GPU_STAGES:-} || $1 == build || $1 =~ ^(${BLPA_GPU_STAGES})$ ]]; }
stage() {  # stage NAME SECONDS COMMAND...: runs it with a time limit, logs, never stops the script
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  echo "=== $name ($(date -u +%T))" | tee -a "$log"
  local t0=$SECONDS
  # -k: blpa-train checkpoints on SIGTERM; a rank stuck in a collective is killed 15 s later.
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  ((rc == 0)) || status=1
  return "$rc"
}
bench() { set -o pipefail; "$BLPA_BUILD_DIR/app/blpa-bench" "$@" --json | tee -a "$bench_log"; }
export -f bench
export bench_log

{
  echo "date: $(date -u +%FT%TZ)"
  # The GPU machine may receive the tree without .git: BLPA_COMMIT names the commit then.
  echo "commit: ${BLPA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$BLPA_TORCH_PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "cpus: $(nproc)"
  # Step times on the H200 had host_ms == median even where the GPU was the bottleneck (batch
  # 512): CUDA_LAUNCH_BLOCKING=1 in the machine's environment would do that. Record it.
  env | grep -E '^(CUDA_|PYTORCH_|TORCH_|CUDNN|CUBLAS|NVIDIA_TF32)' || echo "no CUDA_/PYTORCH_/TORCH_ variables set"
} 2>&1 | tee -a "$log"

# The tests and the trainer's default job read Debian's Fashion-MNIST path; the prefix has it.
fm=/usr/share/datasets/fashion-mnist
if [[ ! -e $fm && -d $prefix$fm ]]; then mkdir -p "$(dirname "$fm")" && ln -s "$prefix$fm" "$fm" || true; fi

stage build 420 scripts/build.sh -DCMAKE_CXX_COMPILER_LAUNCHER= -DCMAKE_CUDA_COMPILER_LAUNCHER= ||
  { tail -n 60 "$BLPA_BUILD_DIR/configure.log" 2>/dev/null | tee -a "$log"; exit 1; }
# BLPA_GPU_TESTS=REGEX runs only the tests whose names match.
# Not the emulated-cuda/ tests: the CPU emulator runs in every CI run; here they would only
# take device time.
# --timeout: a test that hangs on the GPU (a capture that never ends, a collective that waits)
# fails after 120 s instead of taking the stage's whole limit.
stage tests 300 ctest --test-dir "$BLPA_BUILD_DIR" --output-on-failure --no-tests=error --parallel 8 --timeout 120 \
  -E '^emulated-cuda/' ${BLPA_GPU_TESTS:+-R "$BLPA_GPU_TESTS"}
# The plot test needs gnuplot, which the offline prefix does not carry: it alone may skip.
if grep "(Skipped)\|\*\*\*Skipped" "$log" | grep -vq "plot.sh renders"; then
  echo "error: tests were skipped on a GPU machine" | tee -a "$log"; status=1
fi
# Which library std::filesystem calls bind to (LibTorch 2.11 exports a broken copy).
# Paths inside bash -c strings are quoted for that shell (an OUT with a space failed the stage).
q_tests=$(printf %q "$BLPA_BUILD_DIR/tests/blpa_tests") q_out=$(printf %q "$out")
stage fs-bindings 60 bash -c "readelf -d $q_tests | grep NEEDED | head -n 3;
  LD_DEBUG=bindings $q_tests 'data: CIFAR-10 files*' 2>&1 | grep _ZNSt10filesystem | sed 's/^ *[0-9]*: *//' | sort -u | head -n 12"

stage codec 120 bash -c 'for bits in 8 4; do for n in 16777216 268435456; do
  bench codec --device cuda --bits $bits --numel $n || exit 1; done; done'
# --profile: one more step per mode under Kineto/CUPTI; the GPU's busy time against the wall time
# and the costliest kernels. At batch 16 the GPU idles most of the step: what the host costs.
stage step-resnet164 180 bash -c 'bench step --device cuda --model resnet164 --batch 128 --mode all --warmup 5 --steps 30 --profile 14'
stage step-resnet164-b512 180 bash -c 'bench step --device cuda --model resnet164 --batch 512 --mode plain,exact,blpa-4 --warmup 3 --steps 10 --profile 14'
# plain and blpa-4 taking turns, so that the VM's drift from run to run hits both alike:
# each blpa-4 ratio is against the plain just before it.
stage step-interleaved 180 bash -c 'bench step --device cuda --model resnet164 --batch 128 \
  --mode plain,blpa-4,plain,blpa-4,plain,blpa-4 --warmup 5 --steps 20'
stage step-resnet164-b16 120 bash -c 'bench step --device cuda --model resnet164 --batch 16 --mode plain,exact,blpa-4 --warmup 3 --steps 20 --profile 6'
# Chrome traces of one step per mode (the host's operators on both threads and the GPU's
# kernels), gzipped into one archive: chrome://tracing or Perfetto reads them.
trace_dir=$(mktemp -d)
stage trace 180 bash -c "for b in 16 128; do bench step --device cuda --model resnet164 --batch \$b --mode plain,exact,blpa-4 \
  --warmup 3 --steps 5 --profile 6 --trace $trace_dir/resnet164-b\$b || exit 1; done && tar -C $trace_dir -czf $q_out/traces.tgz ."
rm -rf "$trace_dir"
stage memory-resnet164 120 bash -c 'bench memory --device cuda --model resnet164 --batch 128 --mode all'
stage train-bf16 180 "$BLPA_BUILD_DIR/app/blpa-train" --device cuda --depth 20 --mode blpa --precision bf16 \
  --memory-format nhwc --iterations 2000 --lr-steps 1000,1500 --warmup 100 --eval-every 1000 --log-every 200 \
  --workers 4 --quiet --overwrite --log "$out/gpu-train-bf16.jsonl"
for m in plain blpa; do
  stage "train-$m" 180 "$BLPA_BUILD_DIR/app/blpa-train" --device cuda --depth 20 --mode "$m" --iterations 2000 \
    --lr-steps 1000,1500 --warmup 100 --eval-every 1000 --log-every 200 --workers 4 --quiet --overwrite \
    --log "$out/gpu-train-$m.jsonl"
done
stage step-resnet152 180 bash -c 'bench step --device cuda --model resnet152 --batch 64 --mode plain,exact,blpa-4 --warmup 3 --steps 15 --profile 14'
stage memory-resnet152 120 bash -c 'bench memory --device cuda --model resnet152 --batch 64 --mode plain,blpa-4'
# The data pipeline runs on the CPU: BLPA_GPU_CHECK_DATA=1 measures it on this machine's cores too.
[[ ${BLPA_GPU_CHECK_DATA:-0} == 1 ]] && stage data 120 bash -c "bench data --workers 1,2,4,8,$(nproc) --seconds 3"
# The ImageNet path on the GPU: pinned batches, asynchronous copies, ResNet-50, 10-crop eval.
tree=$(mktemp -d)
# imagenet-eval and imagenet-predict read imagenet-train's checkpoint: asking for either runs it.
if ! wanted imagenet-train && { wanted imagenet-eval || wanted imagenet-predict; }; then
  BLPA_GPU_STAGES+="|imagenet-train"
fi
wanted imagenet-train && "$BLPA_BUILD_DIR/app/blpa-bench" data --write-tree "$tree" --images 400 >/dev/null
stage imagenet-train 180 "$BLPA_BUILD_DIR/app/blpa-train" --device cuda --data-dir "$tree" --model imagenet \
  --depth 50 --batch 32 --accum-steps 2 --iterations 30 --warmup 0 --eval-every 0 --log-every 10 --quiet \
  --index-cache '' --overwrite --checkpoint "$tree/ck.pt" --log "$out/gpu-imagenet.jsonl"
stage imagenet-eval 120 "$BLPA_BUILD_DIR/app/blpa-eval" --checkpoint "$tree/ck.pt" --ten-crop --device cuda \
  --index-cache '' --json
# blpa-predict on CUDA (10 crops of one class folder), and how often its top-1 class is the
# CPU's (TF32 convolutions on the GPU may swap near ties).
predict_check() {  # TREE OUT
  local p=$BLPA_BUILD_DIR/app/blpa-predict dir
  dir=$(find "$1/val" -mindepth 1 -maxdepth 1 -type d | sort | head -n 1)
  "$p" --checkpoint "$1/ck.pt" --device cuda --ten-crop "$dir" >"$2/gpu-predict.jsonl" || return 1
  "$p" --checkpoint "$1/ck.pt" --device cpu --ten-crop "$dir" >"$1/cpu-predict.jsonl" || return 1
  top1() { sed -n 's/.*"top": \[{"class": \([0-9]*\).*/\1/p' "$1"; }
  paste <(top1 "$2/gpu-predict.jsonl") <(top1 "$1/cpu-predict.jsonl") |
    awk '{ n++; e += $1 == $2 } END { printf "blpa-predict: top-1 of %d images on CUDA equal to the CPU'"'"'s for %d\n", n, e; exit n == 0 }'
}
export -f predict_check
stage imagenet-predict 120 bash -c 'predict_check "$@"' _ "$tree" "$out"
rm -rf "$tree"
stage max-batch-resnet1001 240 bash -c 'bench max-batch --device cuda --model resnet1001 --budget-gib 8 --mode plain,blpa-4'
# CUDA graphs: each mode eager, then one captured iteration replayed, with the GPU's work
# (--profile) beside the wall time, the kernels a step launches (profile.events; 3,269 plain
# and about 3,600 blpa-4 before the multi-tensor SGD) and the graph's memory pool
# (graph_pool_bytes).
# TEARDOWN_CUPTI=0: as PyTorch's profiler sets it for graphs (CUPTI torn down and set up
# again after a capture crashed on some CUDA releases); the timed steps run before it.
stage step-graphs 420 bash -c 'export TEARDOWN_CUPTI=0; for b in 16 128 512; do bench step --device cuda --model resnet164 --batch $b \
  --mode plain,blpa-4 --cuda-graphs --warmup 3 --steps 20 --profile 6 || exit 1; done &&
  bench step --device cuda --model resnet152 --batch 64 --mode plain,blpa-4 --cuda-graphs --warmup 3 --steps 10 --profile 6'
stage train-graphed 180 "$BLPA_BUILD_DIR/app/blpa-train" --device cuda --depth 20 --mode blpa --cuda-graphs on \
  --iterations 2000 --lr-steps 1000,1500 --warmup 100 --eval-every 1000 --log-every 200 --workers 4 --quiet \
  --overwrite --log "$out/gpu-train-blpa-graphed.jsonl"
# The multi-process CUDA path: two ranks share the GPU and average CUDA gradients through Gloo
# (NCCL refuses two ranks on one device; its one-rank test is among the tests above).
stage gloo-cuda-2proc 180 bash -c 'pids=(); for r in 0 1; do extra=(); [[ $r == 0 ]] && extra=(--overwrite --log "'"$out"'/gpu-gloo-2proc.jsonl");
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 MASTER_PORT=29611 "$BLPA_BUILD_DIR/app/blpa-train" --device cuda:0 --dist-backend gloo \
    --depth 20 --batch 64 --iterations 200 --warmup 0 --eval-every 0 --log-every 50 --quiet --dist-timeout 120 "${extra[@]}" &
  pids+=($!); done; rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done; exit $rc'
# bf16 and channels-last (#15): every precision x layout, plain and blpa-4 taking turns (each
# ratio against plain at the same precision and layout), and PyTorch's own step on the same
# networks beside them (eager, tf32 NCHW and bf16 autocast channels-last). The codec in bf16/NHWC.
stage step-precision 420 bash -c 'bench step --device cuda --model resnet164 --batch 128 --mode plain,blpa-4 \
  --precision tf32,bf16 --memory-format nchw,nhwc --warmup 3 --steps 5 --rounds 3 && for b in 64 128; do
  bench step --device cuda --model resnet152 --batch $b --mode plain,blpa-4 --precision tf32,bf16 \
  --memory-format nchw,nhwc --warmup 2 --steps 3 --rounds 2 || exit 1; done'
stage pytorch-step 300 bash -c 'set -o pipefail; for mb in "resnet164 128" "resnet152 64" "resnet152 128"; do set -- $mb;
  "$BLPA_TORCH_PYTHON" scripts/pytorch-step.py --device cuda --model $1 --batch $2 | tee -a "$bench_log" || exit 1; done'
# gamma as initialised (ones: bf16 values often on a bin edge, the codes' slower exact path)
# and as training leaves it (drawn, pack dividing by it as a unit's does).
stage codec-precision 300 bash -c 'for bits in 8 4; do for dt in fp32 bf16; do for mf in nchw nhwc; do
  for g in ones drawn; do bench codec --device cuda --bits $bits --numel 268435456 --precision $dt \
  --memory-format $mf --gamma $g || exit 1; done; done; done; done'
# Nsight Compute on the codec's kernels, where the machine's toolkit has it: how busy the issue
# slots, the pipes (ComputeWorkloadAnalysis: against scripts/sass-hot-path.sh's model) and the
# memory are, what the warps wait for, and the instructions each kernel issues
# (bf16 NHWC with gamma 1 and drawn, fp32 NHWC, 4-bit, 16M elements; NHWC is the layout
# CUDA runs take by default). With --reps 1 each of the bench's
# operations launches 6 times, in order: pack, the fused and unfused forwards (pack_kernel;
# cuDNN's BatchNorm may match bn_), unpack, the BatchNorm backward (2 or 3 kernels): 60
# launches hold them all. Counters may be refused in a container (ERR_NVGPUCTRPERM): then the
# stage fails at once. Then bf16 NHWC drawn at 128M elements (the packs and unpack: at 16M a
# pack thread takes 4 groups, so its prologue and per-block table weigh on the per-element
# counts; 2026-12-04: 31 warp instructions per 32 elements), and at 16M the warps' stall
# reasons per issued instruction (smsp__average_warps_issue_stalled_*: WarpStateStats prints
# none where PC sampling is refused, as on 2026-12-04; where these counters are refused too, it
# says so and the stage still passes), then the bf16 pack loading 4 groups a thread
# (BLPA_PACK_UNROLL=4) at 128M elements, with its stall reasons where they were not refused.
stage ncu-codec 300 bash -c 'n=$(command -v ncu || echo /usr/local/cuda/bin/ncu); [[ -x $n ]] || { echo "no ncu"; exit 1; }
  sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats
    --section InstructionStats); b=("$BLPA_BUILD_DIR/app/blpa-bench" codec --device cuda --bits 4 --reps 1)
  for cfg in "bf16 nhwc ones" "bf16 nhwc drawn" "fp32 nhwc ones"; do set -- $cfg; "$n" "${sections[@]}" \
    -k regex:"pack_kernel|pack_table|unpack_kernel|bn_" -c 60 "${b[@]}" --numel 16777216 --precision $1 \
    --memory-format $2 --gamma $3 || exit 1; done
  "$n" "${sections[@]}" -k regex:"pack_kernel|pack_table|unpack_kernel" -c 30 "${b[@]}" --numel 134217728 \
    --precision bf16 --memory-format nhwc --gamma drawn || exit 1
  stalls=(--metrics "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$")
  "$n" "${stalls[@]}" -k regex:"pack_kernel|unpack_kernel" -c 24 "${b[@]}" --numel 16777216 --precision bf16 \
    --memory-format nhwc --gamma drawn || { echo "ncu-codec: the stall counters were refused (above)"; stalls=(); }
  BLPA_PACK_UNROLL=4 "$n" "${sections[@]}" "${stalls[@]}" -k regex:"pack_kernel" -c 6 "${b[@]}" --numel 134217728 \
    --precision bf16 --memory-format nhwc --gamma drawn'
# Where a bf16 channels-last step's time goes, eager and graphed (ResNet-152 batch 128, where
# blpa-4 took 1.25x plain at 1d696ed; ResNet-164 batch 128): the costliest kernels of each.
stage step-precision-profile 240 bash -c 'bench step --device cuda --model resnet152 --batch 128 --mode plain,blpa-4 \
  --precision bf16 --memory-format nhwc --cuda-graphs --warmup 2 --steps 5 --profile 3 &&
  bench step --device cuda --model resnet164 --batch 128 --mode plain,blpa-4 --precision bf16 --memory-format nhwc \
  --cuda-graphs --warmup 3 --steps 10 --profile 3'
# The fused forward (bn_relu_pack: a unit's BatchNorm output, ReLU and codes in one pass)
# against LibTorch's BatchNorm then the pack (BLPA_FUSED_FORWARD=0): each beside plain in its
# process, graphed, bf16 channels-last, where blpa-4 took 1.16x and 1.22x plain at fedcee4.
stage step-fused 300 bash -c 'for f in 0 1; do for mb in "resnet164 128" "resnet152 128"; do set -- $mb;
  BLPA_FUSED_FORWARD=$f bench step --device cuda --model $1 --batch $2 --mode plain,blpa-4 --precision bf16 \
  --memory-format nhwc --cuda-graphs --warmup 3 --steps 10 --rounds 2 || exit 1; done; done'
# The NHWC BatchNorm backward with 8 and 4 channels a thread (BLPA_BN_NHWC_VECTOR; 8 is the
# default): with 4 it holds about 60 registers instead of about 95, so an SM holds twice its
# warps, for a third more instructions an element (scripts/sass-hot-path.sh); in float32 (tf32
# runs, NHWC by default) about 120 registers against 70. The codec bench's bn_relu_backward
# (NHWC, gamma drawn, bf16 and float32) with 8, 4, 8, 4; then ResNet-152's graphed
# bf16 step and its costliest kernels with 8, then 4 (the log names each before it runs).
stage bn-vector 240 bash -c 'for v in 8 4 8 4; do for p in bf16 fp32; do echo "BLPA_BN_NHWC_VECTOR=$v $p";
  BLPA_BN_NHWC_VECTOR=$v bench codec --device cuda --bits 4 --numel 268435456 --precision $p --memory-format nhwc \
  --gamma drawn || exit 1; done; done
  for v in 8 4; do echo "BLPA_BN_NHWC_VECTOR=$v"; BLPA_BN_NHWC_VECTOR=$v bench step --device cuda --model resnet152 \
  --batch 128 --mode blpa-4 --precision bf16 --memory-format nhwc --cuda-graphs --warmup 2 --steps 5 --profile 3 ||
  exit 1; done'
# The NHWC BatchNorm backward's grid: one wave of as many blocks as an SM holds (the default
# since stop 35) against 16 blocks an SM (BLPA_BN_NHWC_BLOCKS=16, the grid before it, 8
# waves). The codec bench's bn_relu_backward (bf16 and float32; 256M elements of 64 channels,
# and ResNet-164's first 16-channel layer at batch 128, where a thread took one row) with one
# wave, 16, one wave, 16; then the graphed bf16 steps of ResNet-164 and ResNet-152, blpa-4
# beside plain, with one wave, then 16 (the log names each before it runs).
stage bn-grid 300 bash -c 'for n in "" 16 "" 16; do for p in bf16 fp32; do for s in "268435456 64" "2097152 16"; do
  set -- $s; echo "BLPA_BN_NHWC_BLOCKS=$n $p $1 x $2"; BLPA_BN_NHWC_BLOCKS=$n bench codec --device cuda --bits 4 \
  --numel $1 --channels $2 --hw 32 --precision $p --memory-format nhwc --gamma drawn || exit 1; done; done; done
  for n in "" 16; do for mb in "resnet164 128" "resnet152 128"; do set -- $mb; echo "BLPA_BN_NHWC_BLOCKS=$n $1";
  BLPA_BN_NHWC_BLOCKS=$n bench step --device cuda --model $1 --batch $2 --mode plain,blpa-4 --precision bf16 \
  --memory-format nhwc --cuda-graphs --warmup 3 --steps 10 --rounds 2 || exit 1; done; done'
# pack's and unpack's kernels for the common path (whole aligned groups: every layer of the
# networks; no branches or registers for the rest) against their kernels for any shape
# (BLPA_CODEC_GENERAL=1, which ran every launch until they were split): the codec bench in
# bf16 and float32 NHWC, 256M elements of 64 channels and ResNet-164's first layer at batch
# 128 (2M of 16), common, general, common, general; then the graphed bf16 steps of ResNet-164
# and ResNet-152, blpa-4 beside plain, common then general (the log names each before it runs).
stage codec-common 300 bash -c 'for g in 0 1 0 1; do for p in bf16 fp32; do for s in "268435456 64" "2097152 16"; do
  set -- $s; echo "BLPA_CODEC_GENERAL=$g $p $1 x $2"; BLPA_CODEC_GENERAL=$g bench codec --device cuda --bits 4 \
  --numel $1 --channels $2 --hw 32 --precision $p --memory-format nhwc --gamma drawn || exit 1; done; done; done
  for g in 0 1; do for mb in "resnet164 128" "resnet152 128"; do set -- $mb; echo "BLPA_CODEC_GENERAL=$g $1";
  BLPA_CODEC_GENERAL=$g bench step --device cuda --model $1 --batch $2 --mode plain,blpa-4 --precision bf16 \
  --memory-format nhwc --cuda-graphs --warmup 3 --steps 10 --rounds 2 || exit 1; done; done'
# The bf16 pack's common-path kernels loading 4 groups a thread (BLPA_PACK_UNROLL=4: 64 bytes of
# loads in flight a thread, as the float32 pack's 2 groups, at 3 blocks an SM) against the
# default 2 (32 bytes, 4 blocks), taking turns: 4- and 8-bit, both layouts, gamma drawn, 256M
# elements; then the graphed bf16 channels-last steps, blpa-4 beside plain, with each.
stage codec-unroll 240 bash -c 'for r in 1 2; do for u in 2 4; do for bits in 4 8; do for mf in nhwc nchw; do
  echo "BLPA_PACK_UNROLL=$u $bits-bit $mf"; BLPA_PACK_UNROLL=$u bench codec --device cuda --bits $bits \
  --numel 268435456 --precision bf16 --memory-format $mf --gamma drawn || exit 1; done; done; done; done
  for u in 2 4; do for mb in "resnet164 128" "resnet152 128"; do set -- $mb; echo "BLPA_PACK_UNROLL=$u $1";
  BLPA_PACK_UNROLL=$u bench step --device cuda --model $1 --batch $2 --mode plain,blpa-4 --precision bf16 \
  --memory-format nhwc --cuda-graphs --warmup 3 --steps 10 --rounds 2 || exit 1; done; done'
stage memory-precision 180 bash -c 'bench memory --device cuda --model resnet152 --batch 64 --mode blpa-4 \
  --precision bf16 --memory-format nhwc'
# The paper's hardware claim (#19): ResNet-152 at ImageNet's batch 256 on an 11 GB card (the
# 1080 Ti's), and what 80 GiB holds; each batch trained whole, and in 4 parts as blpa-train
# --accum-steps 4 does. Real attempts under the caching allocator's memory fraction.
for gib in 11 80; do
  for k in 1 4; do
    stage "max-batch-resnet152-${gib}g-accum$k" 600 bash -c "bench max-batch --device cuda --model resnet152 \
      --budget-gib $gib --accum-steps $k --max 8192 --mode plain,blpa-4"
  done
done
echo "status: $status; results in $out" | tee -a "$log"
exit "$status"
