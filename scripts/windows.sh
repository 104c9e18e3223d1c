#!/usr/bin/env bash
# The measurements behind the choice of the codes' windows (docs/results.md, "Windows"):
#   checkpoints  trains plain ResNets on Fashion-MNIST (batch 64, seed 1) and keeps copies of
#                their checkpoints: ResNet-20 for 1000 iterations (copies at 500 and 1000) and
#                for 2000 (copies at 250, 500, 1000, 1500, 2000: checkpoints-d20), ResNet-
#                56/110/164 for 500 (copies at 250 and 500: checkpoints-deep); an interrupted
#                stage resumes where it stopped
#   fidelity     blpa-bench fidelity over bits x windows, at drawn parameters (fidelity-drawn)
#                and at those checkpoints (fidelity-trained)
#   accuracy     the Fashion-MNIST study (ResNet-11, batch 32, 500 iterations) for plain and
#                blpa 8/4/2 at the chosen formats and at the paper's (window 6), seeds 1-3
# Usage: scripts/windows.sh STAGE... (default: all three). JSON lines and checkpoints go to
# results/windows/ (git-ignored). Set BLPA_BIN to use programs from another build; NICE
# (default 10) is the niceness of the runs. On 2 cores shared with other work: the
# checkpoints take hours (ResNet-56 trains at about 5 images/s; ResNet-110/164 were not
# trained for docs/results.md), the fidelity sweeps about 30 minutes, the accuracy study
# about 70 minutes.
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
for stage in "${stages[@]}"; do  # all checked first: a typo was found after the stages before it ran
  [[ $stage =~ ^(checkpoints|checkpoints-d20|checkpoints-deep|fidelity|fidelity-drawn|fidelity-trained|accuracy)$ ]] || { echo "unknown stage $stage (checkpoints, fidelity[-drawn|-trained], accuracy)" >&2; exit 2; }
done

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
  # An interrupted run continues; one killed before its first checkpoint (with
  # --checkpoint-every 100000, a SIGKILL or a reboot) starts again over its log, which alone
  # was refused at every rerun.
  local resume=(--overwrite)
  [[ -f $out/ckpt/$name.ckpt ]] && resume=(--resume)
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

# ResNet-20: 1000 iterations (the main job's schedule), and 2000 for points later in a run.
checkpoints_d20() {
  train 20 1000 600,850 500 1000
  train 20 2000 1200,1700 250 500 1000 1500 2000
}

# The deeper networks for 500 iterations, the same schedule compressed: a ResNet-164 step
# costs about 13 ResNet-20 steps, and 2 shared cores allow no more.
checkpoints_deep() {
  for d in 56 110 164; do train "$d" 500 300,425 250 500; done
}

# sweep_windows NETWORKS...: blpa-bench fidelity on the given networks (--depths D,... --batch
# 16, or --checkpoint PATH,... --batch 64) for every bits x window, centred (lift 0).
sweep_windows() {
  run "$bin/blpa-bench" fidelity "$@" --json --modes blpa --bits 8,4,2 --windows 2,3,4,6,8,12,16,24 --lifts 0
}

# sweep_lifts NETWORKS...: bits x window x lift near the best windows, then naive at the
# paper's window and at the defaults.
sweep_lifts() {
  local fid=("$bin/blpa-bench" fidelity "$@" --json)
  run "${fid[@]}" --modes blpa --bits 8 --windows 12,16 --lifts 0.5,1
  run "${fid[@]}" --modes blpa --bits 4 --windows 6,7,8 --lifts 0.5,1,1.5,2
  run "${fid[@]}" --modes blpa --bits 4 --windows 7 --lifts 0
  run "${fid[@]}" --modes blpa --bits 2 --windows 3,4,5,6 --lifts 0.5,1,1.5,2
  run "${fid[@]}" --modes blpa --bits 2 --windows 5 --lifts 0
  run "${fid[@]}" --modes naive --bits 8,4,2 --windows 6,default
}

# fidelity_on NAME NETWORKS...: both sweeps into fidelity-NAME.jsonl and fidelity-NAME-lifts.jsonl.
# FIDELITY_PARTS (default "windows lifts") picks the sweeps.
fidelity_on() {
  local name=$1
  shift
  if [[ " ${FIDELITY_PARTS:-windows lifts} " == *" windows "* ]]; then
    sweep_windows "$@" >"$out/fidelity-$name.jsonl.tmp"
    mv "$out/fidelity-$name.jsonl.tmp" "$out/fidelity-$name.jsonl"
  fi
  if [[ " ${FIDELITY_PARTS:-windows lifts} " == *" lifts "* ]]; then
    sweep_lifts "$@" >"$out/fidelity-$name-lifts.jsonl.tmp"
    mv "$out/fidelity-$name-lifts.jsonl.tmp" "$out/fidelity-$name-lifts.jsonl"
  fi
}

fidelity_drawn() { fidelity_on drawn --depths 20,56,110,164 --batch 16; }

# At trained weights: every copy the checkpoints stage kept (ResNet-20 along its runs, the
# deeper networks as far as they were trained), on a batch of 64 of their training images.
fidelity_trained() {
  local have=("$out"/ckpt/*-it*.ckpt)
  fidelity_on trained --checkpoint "$(IFS=,; echo "${have[*]}")" --batch 64
}

# The accuracy study, sized to fit about 45 minutes of 2 shared cores: ResNet-11 (the
# smallest of the family) on Fashion-MNIST, batch 32, 500 iterations (about a quarter of an
# epoch: warm-up 50 at 0.01, then 0.1, divided by 10 at 350 and 450), scored once at the end
# on the whole test set (10,000 images); every mode name (as blpa-bench writes them: blpa-K
# is the paper's window 6 and lift 0, -wW another window, -lL a lift) for seeds 1-3.
# ACCURACY_MODES and ACCURACY_SEEDS pick a part; ACCURACY_JOBS (default 2) runs side by side.
accuracy_one() {
  local seed=$1 mode=$2 log=$out/fashion-$1-$2.jsonl args=(--mode "${2%%-*}")
  [[ -f $log ]] && grep -q '"type": "eval", "iter": 500,' "$log" && return  # done
  rm -f "$log"
  if [[ $mode == *-* ]]; then  # blpa-K[-wW][-lL]
    local rest=${mode#*-} window=6 lift=0
    [[ $rest =~ -w([0-9.]+) ]] && window=${BASH_REMATCH[1]}
    [[ $rest =~ -l(-?[0-9.]+) ]] && lift=${BASH_REMATCH[1]}
    args+=(--bits "${rest%%-*}" --window "$window" --lift "$lift")
  fi
  run "$bin/blpa-train" --depth 11 --batch 32 --iterations 500 --warmup 50 --lr-steps 350,450 \
    --eval-every 0 --log-every 50 --seed "$seed" --quiet "${args[@]}" --log "$log"
}

accuracy() {
  local modes=${ACCURACY_MODES:-plain blpa-8-w12 blpa-8 blpa-4-l1 blpa-4 blpa-2-w4-l1 blpa-2}
  local seeds=${ACCURACY_SEEDS:-1 2 3} jobs=${ACCURACY_JOBS:-2}
  for seed in $seeds; do
    for mode in $modes; do
      # A run that fails is found by its log below (wait -n under set -e ended the script and
      # left the other runs going; the last runs' failures went unsaid).
      while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
      accuracy_one "$seed" "$mode" &
    done
  done
  wait || true
  local failed=0
  for seed in $seeds; do
    for mode in $modes; do
      grep -q '"type": "eval", "iter": 500,' "$out/fashion-$seed-$mode.jsonl" 2>/dev/null ||
        { echo "fashion-$seed-$mode: did not finish" >&2; failed=1; }
    done
  done
  return "$failed"
}

for stage in "${stages[@]}"; do
  case $stage in
    checkpoints) checkpoints_d20; checkpoints_deep ;;
    checkpoints-d20) checkpoints_d20 ;;
    checkpoints-deep) checkpoints_deep ;;
    fidelity) fidelity_drawn; fidelity_trained ;;
    fidelity-drawn) fidelity_drawn ;;
    fidelity-trained) fidelity_trained ;;
    accuracy) accuracy ;;
    *) echo "unknown stage $stage (checkpoints, fidelity[-drawn|-trained], accuracy)" >&2; exit 2 ;;
  esac
done
