#!/usr/bin/env bash
# The CPU measurements behind --precision and --memory-format (docs/results.md, "Precision
# and layout"):
#   step      blpa-bench step: plain and blpa-4 in fp32 and bf16, NCHW and NHWC, taking turns
#             (--rounds), on ResNet-20 (28x28, batch 64) and ResNet-164 (batch 32)
#   fidelity  blpa-bench fidelity at depths 20/56/110 in fp32 and in bf16 NHWC
#   accuracy  Fashion-MNIST, ResNet-20, batch 64, 600 iterations, seeds 1-3: fp32 plain,
#             bf16 plain, bf16 blpa-4 (NHWC), scored on all 10,000 test images
#   accuracy-long  the same for 2,000 iterations (2.1 epochs, the schedule of study.sh), where
#             the seeds' spread is small enough to compare to half a point (28 minutes on 2 cores)
# Usage: scripts/precision.sh STAGE... (default: all three). JSON lines go to
# results/precision/ (git-ignored). BLPA_BIN: programs from another build; NICE (default 10).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${BLPA_BIN:-${BLPA_BUILD_DIR:-$here/build}/app}
out=$here/results/precision
mkdir -p "$out"
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(step fidelity accuracy)
for stage in "${stages[@]}"; do  # all checked first: a typo was found after the stages before it ran
  [[ $stage =~ ^(step|fidelity|accuracy|accuracy-long)$ ]] || { echo "unknown stage $stage (step, fidelity, accuracy, accuracy-long)" >&2; exit 2; }
done

# Fashion-MNIST accuracy of the three settings, seeds 1-3, scored on all 10,000 test images:
# one LibTorch thread per run, two runs side by side (2 cores).
#   accuracy ITERATIONS WARMUP LR_STEPS SUFFIX (of the files' names)
accuracy() {
  local iterations=$1 warmup=$2 lr_steps=$3 suffix=$4 seed mode precision layout name
  for seed in 1 2 3; do
    for setting in "plain fp32 nchw" "plain bf16 nhwc" "blpa bf16 nhwc"; do
      read -r mode precision layout <<<"$setting"
      name=fashion-$mode-$precision-$layout$suffix-seed$seed
      OMP_WAIT_POLICY=passive nice -n "${NICE:-10}" "$bin/blpa-train" --depth 20 --batch 64 \
        --iterations "$iterations" --warmup "$warmup" --lr-steps "$lr_steps" --eval-every 0 --log-every 50 \
        --seed "$seed" --threads 1 --quiet --mode "$mode" --precision "$precision" --memory-format "$layout" \
        --overwrite --log "$out/$name.jsonl" --summary "$out/$name.json" &
      # A run that fails is found by its summary below (wait -n under set -e ended the script
      # and left the other run going; the last runs' failures went unsaid).
      while (($(jobs -r | wc -l) >= 2)); do wait -n || true; done
    done
  done
  wait || true
  local failed=0 f
  for seed in 1 2 3; do
    for setting in "plain fp32 nchw" "plain bf16 nhwc" "blpa bf16 nhwc"; do
      read -r mode precision layout <<<"$setting"
      f=$out/fashion-$mode-$precision-$layout$suffix-seed$seed.json
      grep -q '"status": "done"' "$f" 2>/dev/null || { echo "$(basename "$f" .json): did not finish" >&2; failed=1; }
    done
  done
  for f in "$out"/fashion-*-{nchw,nhwc}"$suffix"-seed?.json; do echo "$(basename "$f" .json) $(grep -o '"test_acc": [0-9.]*' "$f")"; done
  return "$failed"
}
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet || echo ' (with local changes)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} >>"$out/machine.txt"

for stage in "${stages[@]}"; do
  case $stage in
    step)
      "$bin/blpa-bench" step --model cifar:20 --size 28 --batch 64 --mode plain,blpa-4 --precision fp32,bf16 \
        --memory-format nchw,nhwc --warmup 2 --steps 3 --rounds 3 --json | tee "$out/step-resnet20.jsonl"
      "$bin/blpa-bench" step --model resnet164 --batch 32 --mode plain,blpa-4 --precision fp32,bf16 \
        --memory-format nchw,nhwc --warmup 1 --steps 2 --rounds 3 --json | tee "$out/step-resnet164.jsonl"
      ;;
    fidelity)
      for p in "fp32 nchw" "bf16 nhwc"; do
        set -- $p
        "$bin/blpa-bench" fidelity --depths 20,56,110 --batch 16 --modes blpa,naive --bits 4 --precision "$1" \
          --memory-format "$2" --json
      done | tee "$out/fidelity.jsonl"
      ;;
    accuracy) accuracy 600 50 400,520 "" ;;
    accuracy-long) accuracy 2000 100 1200,1700 -2000 ;;
    *) echo "unknown stage $stage (step, fidelity, accuracy, accuracy-long)" >&2; exit 2 ;;
  esac
done
