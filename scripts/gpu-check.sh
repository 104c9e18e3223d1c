#!/usr/bin/env bash
# For a machine with an NVIDIA GPU and PyTorch, but no package registry: builds blpa with
# BLPA_CUDA=ON against that PyTorch, runs every test (CUDA ones included, none may skip),
# then the GPU benchmarks, and writes results/gpu-check-<date>.txt with the GPU and commit.
# Needs third_party/prefix from scripts/prepare-offline-deps.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
out=${OUT:-$here/results}
mkdir -p "$out"
log=$out/gpu-check-$(date -u +%Y%m%d-%H%M%S).txt
[[ -d third_party/prefix/usr ]] || { echo "third_party/prefix missing: run scripts/prepare-offline-deps.sh where a registry is reachable" >&2; exit 1; }
export BLPA_OFFLINE=1 BLPA_CUDA=ON BLPA_TORCH_PYTHON=${BLPA_TORCH_PYTHON:-python3}
export BLPA_PREFIX=$here/third_party/prefix/usr BLPA_BUILD_DIR=$here/build-gpu
export LD_LIBRARY_PATH=$here/third_party/prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$BLPA_TORCH_PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$log"
scripts/build.sh -DCMAKE_CXX_COMPILER_LAUNCHER= -DCMAKE_CUDA_COMPILER_LAUNCHER= 2>&1 | tail -n 5 | tee -a "$log"
(cd "$BLPA_BUILD_DIR" && ctest --output-on-failure --no-tests=error --parallel 4) 2>&1 | tee -a "$log"
if grep -q "(Skipped)" "$log"; then echo "error: tests were skipped on a GPU machine" | tee -a "$log"; exit 1; fi
bench=$BLPA_BUILD_DIR/app/blpa-bench
for bits in 8 4; do
  for numel in 16777216 268435456; do "$bench" codec --device cuda --bits "$bits" --numel "$numel" --json; done
done 2>&1 | tee -a "$log"
"$bench" memory --device cuda --model resnet164 --batch 128 --mode all --json 2>&1 | tee -a "$log"
"$bench" step --device cuda --model resnet164 --batch 128 --mode all --warmup 3 --steps 20 --json 2>&1 | tee -a "$log"
"$bench" max-batch --device cuda --model resnet1001 --budget-gib 16 --mode plain,blpa-4 --json 2>&1 | tee -a "$log"
echo "results: $log"
