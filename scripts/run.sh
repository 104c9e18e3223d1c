#!/usr/bin/env bash
# The README's main command: set-up, build, then a real training job.
# Default: ResNet-20 (CIFAR-style, bottleneck) with 4-bit activations on Debian's
# Fashion-MNIST, 1,000 iterations of batch 64 (about one epoch; a few minutes on 2 cores),
# evaluated on the full test set. With BLPA_DATA_DIR pointing at CIFAR binary files it runs
# the paper's CIFAR protocol instead (ResNet-164, 64k iterations: days on a CPU, use a GPU
# with BLPA_DEVICE=cuda). Extra arguments are passed to blpa-train and override these
# (--mode plain, --resume to continue a stopped run, --auto-resume to continue it if there is
# one, else start, --overwrite to start it again).
# Log, checkpoint and exported weights go to results/ (git-ignored).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
"$here/scripts/build.sh"
out=$here/results
mkdir -p "$out"
train=$BLPA_BUILD_DIR/app/blpa-train
device=(--device "${BLPA_DEVICE:-cpu}")
# The files are named after the data set, depth and mode (blpa-train's default: blpa, 4 bits);
# a --dataset, --preset, --depth, --mode or --bits among the extra arguments renames them.
mode=blpa bits=4 depth= data= preset= dir=${BLPA_DATA_DIR:-} log=
prev=
for a in "$@"; do
  case $prev in
    --mode) mode=$a ;; --bits) bits=$a ;; --depth) depth=$a ;; --dataset) data=$a ;; --data-dir) dir=$a ;;
    --preset) data=$a depth=${depth:-152} preset=1 ;; --log) log=$a ;;
  esac
  case $a in
    --mode=*) mode=${a#*=} ;; --bits=*) bits=${a#*=} ;; --depth=*) depth=${a#*=} ;; --dataset=*) data=${a#*=} ;;
    --data-dir=*) dir=${a#*=} ;; --preset=*) data=${a#*=} depth=${depth:-152} preset=1 ;; --log=*) log=${a#*=} ;;
  esac
  prev=$a
done
[[ $mode == blpa || $mode == naive ]] && mode=$mode$bits
# The data set blpa-train finds in the data folder, as it names it (runs on CIFAR-100 and
# CIFAR-10, or a --data-dir among the arguments and Fashion-MNIST, shared their files' names);
# CIFAR-10's runs stay "cifar". A folder it cannot read is its run's error, said there.
if [[ -z $data && -n $dir ]]; then
  data=$("$train" --data-dir "$dir" --print-config 2>/dev/null | sed -n 's/^dataset=//p') || data=
  [[ $data != cifar10 ]] || data=cifar
fi
if [[ -n ${BLPA_DATA_DIR:-} ]]; then
  name=${data:-cifar}-resnet${depth:-164}-$mode
  args=(--data-dir "$BLPA_DATA_DIR")  # every other flag at its default: the paper's protocol
elif [[ -n $preset ]]; then  # the preset's protocol, whole: its --data-dir is among the arguments
  name=$data-resnet$depth-$mode
  args=()
else
  name=${data:-fashion-mnist}-resnet${depth:-20}-$mode
  args=(--depth 20 --batch 64 --iterations 1000 --warmup 100 --lr-steps 600,850 --eval-every 500 --log-every 20)
fi
echo "== blpa-train ${args[*]-} ${device[*]} $* (log: ${log:-results/$name.jsonl}) ==" >&2  # a --log given wins
exec "$train" ${args[@]+"${args[@]}"} "${device[@]}" --log "$out/$name.jsonl" --checkpoint "$out/$name.ckpt" \
  --export "$out/$name.pt" "$@"
