#!/usr/bin/env bash
# The measurements behind the choice of the codes' windows (docs/results.md, "Windows"):
#   checkpoints  trains plain ResNets on Fashion-MNIST and keeps copies of their checkpoints:
#                depths 20/56/110/164 for 1000 iterations (copies at 500 and 1000), and depth 20
#                for the study's 2000 (copies at 250, 500, 1000, 1500, 2000)
#   fidelity     blpa-bench fidelity over bits x windows, at drawn parameters (fidelity-drawn)
#                and at those checkpoints (fidelity-trained)
#   accuracy     the Fashion-MNIST study (ResNet-20, batch 64, 2000 iterations) for plain and
#                blpa 8/4/2 at the default windows and at the paper's 6, seeds 1-3
# Usage: scripts/windows.sh STAGE... (default: all three). JSON lines and checkpoints go to
# results/windows/ (git-ignored). Set BLPA_BIN to use programs from another build; NICE
# (default 10) is the niceness of the runs. About 6 hours on 2 shared cores, most of it the
# accuracy runs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${BLPA_BIN:-${BLPA_BUILD_DIR:-$here/build}/app}
out=$here/results/windows
mkdir -p "$out/ckpt"
# One LibTorch thread per run: on a machine shared with other jobs, two threads of a
# parallel region wait for each other whenever one is descheduled (a ResNet-20 step took
# 10x the CPU time). The figures do not depend on it.
run() { OMP_WAIT_POLICY=passive nice -n "${NICE:-10}" "$@" --threads 1; }
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(checkpoints fidelity accuracy)

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet || echo ' (with local changes)')"
  echo "programs: $bin"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
} >>"$out/machine.txt"

# train DEPTH ITERATIONS LR_STEPS POINTS...: plain, seed 1, one resumed chunk per point, each
# checkpoint copied to ckpt/plain-dDEPTH-ITERATIONS-itPOINT.ckpt. A resumed run is the
# identical run (the data order is a function of seed and iteration).
train() {
  local depth=$1 its=$2 steps=$3 name=plain-d$1-$2
  shift 3
  local resume=()
  [[ -f $out/ckpt/$name.ckpt ]] && resume=(--resume)  # an interrupted run continues
  for point in "$@"; do
    if [[ ! -f $out/ckpt/$name-it$point.ckpt ]]; then
      run "$bin/blpa-train" --mode plain --depth "$depth" --batch 64 --iterations "$point" --warmup 100 \
        --lr-steps "$steps" --eval-every 0 --test-subset 2000 --log-every 50 --seed 1 --quiet \
        --checkpoint "$out/ckpt/$name.ckpt" --checkpoint-every 100000 "${resume[@]}" --log "$out/$name.jsonl"
      cp "$out/ckpt/$name.ckpt" "$out/ckpt/$name-it$point.ckpt"
    fi
    resume=(--resume)
  done
}

# The sweep: every bits x window for blpa; naive at the paper's window and the defaults.
sweep=(--modes blpa --bits 8,4,2 --windows 2,3,4,6,8,12,16,24)

fidelity_drawn() {
  local f=$out/fidelity-drawn.jsonl
  run "$bin/blpa-bench" fidelity --depths 20,56,110,164 --batch 16 "${sweep[@]}" --json >"$f.tmp"
  run "$bin/blpa-bench" fidelity --depths 20,56,110,164 --batch 16 --modes naive --bits 8,4,2 \
    --windows 6,default --json >>"$f.tmp"
  mv "$f.tmp" "$f"
}

# At trained weights: the four depths after 1000 iterations, and ResNet-20 along a 2000-iteration run.
fidelity_trained() {
  local f=$out/fidelity-trained.jsonl ckpts=()
  for d in 20 56 110 164; do
    [[ -f $out/ckpt/plain-d$d-1000-it1000.ckpt ]] && ckpts+=("$out/ckpt/plain-d$d-1000-it1000.ckpt")
  done
  for p in 250 500 1000 1500 2000; do ckpts+=("$out/ckpt/plain-d20-2000-it$p.ckpt"); done
  run "$bin/blpa-bench" fidelity --checkpoint "$(IFS=,; echo "${ckpts[*]}")" --batch 64 "${sweep[@]}" --json >"$f.tmp"
  mv "$f.tmp" "$f"
}

# accuracy [SEEDS]: ResNet-20 on Fashion-MNIST, the study's protocol (scripts/study.sh).
accuracy() {
  local seeds=${ACCURACY_SEEDS:-1 2 3}
  for seed in $seeds; do
    for mode in plain blpa-8 blpa-8-w6 blpa-4 blpa-4-w6 blpa-2 blpa-2-w6; do
      local log=$out/fashion-$mode-seed$seed.jsonl args=(--mode "${mode%%-*}")
      [[ -f $log ]] && grep -q '"type": "eval", "iter": 2000' "$log" && continue  # done
      [[ $mode == *-* ]] && args+=(--bits "$(cut -d- -f2 <<<"$mode")")
      [[ $mode == *-w* ]] && args+=(--window "${mode##*-w}")
      run "$bin/blpa-train" --depth 20 --batch 64 --iterations 2000 --warmup 100 --lr-steps 1200,1700 \
        --eval-every 500 --log-every 20 --seed "$seed" --quiet "${args[@]}" --log "$log"
    done
  done
}

for stage in "${stages[@]}"; do
  case $stage in
    checkpoints)
      train 20 1000 600,850 500 1000
      train 20 2000 1200,1700 250 500 1000 1500 2000
      for d in 56 110 164; do train "$d" 1000 600,850 500 1000; done
      ;;
    fidelity) fidelity_drawn; fidelity_trained ;;
    fidelity-drawn) fidelity_drawn ;;
    fidelity-trained) fidelity_trained ;;
    accuracy) accuracy ;;
    *) echo "unknown stage $stage (checkpoints, fidelity[-drawn|-trained], accuracy)" >&2; exit 2 ;;
  esac
done
