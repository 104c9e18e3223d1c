#!/usr/bin/env bash
# The README's main command: set-up, build, then the main job.
# The trainer (blpa-train) does not exist yet. Until it does, the main job measures what
# blpa already does: the codec's throughput and the memory one training step of
# ResNet-164 keeps for backward in each mode (batch 128 by default, BLPA_BATCH to change).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export BLPA_BUILD_DIR=${BLPA_BUILD_DIR:-$here/build}
"$here/scripts/build.sh" "$@"
bench=$BLPA_BUILD_DIR/app/blpa-bench
echo "== blpa: no trainer yet; measuring the codec and ResNet-164's training-step memory on the CPU =="
"$bench" codec --bits 4
"$bench" memory --model resnet164 --batch "${BLPA_BATCH:-128}" --mode all
