#!/usr/bin/env bash
# The real-photo regime at 224 px on one GPU, in about 8 minutes: training throughput and a one-target Table 1.
#
#   python bench/gpu_subset.py --source PATH/imagenette-224.tar.gz     # once, on any machine: the 18 MB subset
#   bash bench/gpu_check.sh                                            # on the GPU machine
#
# Data: bench/gpu_data/imagenette-subset.tar.gz (git-ignored; give it to the device tool with carry), 130 training
# and 60 val photos per class, split by protocol imagenette-ciba (1,000 / 500 / 1,400). Settings: the photo128 recipe
# at 224 px (resize 256, the paper's 24 px trigger), 48 bits, M = 60, eps 8/255, lambda 0.8, b = 20, 2,000 trigger
# steps; one target (cassette player, the first of Table 1's draw). Everything goes to bench/results/gpu_check/:
# the throughput JSON, table1.{md,json}, and gpu_check.log with nvidia-smi and the wall time of each step.
# EPOCHS, STEPS, TARGET, WORKERS, SUBSET and OUT override the settings (EPOCHS=1 STEPS=4 for a smoke run on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSET=${SUBSET:-bench/gpu_data/imagenette-subset.tar.gz}
OUT=${OUT:-bench/results/gpu_check}
EPOCHS=${EPOCHS:-30}
STEPS=${STEPS:-2000}
TARGET=${TARGET:-2}
WORKERS=${WORKERS:-8}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
[ -f "$SUBSET" ] || { echo "gpu_check: $SUBSET not found; make it with python bench/gpu_subset.py --source PATH"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "gpu_check: no nvidia-smi (no GPU)"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$SECONDS
step() { local t=$SECONDS; "$@"; echo "gpu_check: $(( SECONDS - t )) s: $*"; }
step python prepare_data.py --dataset imagenette --source "$SUBSET" --out "$WORK/data"
step python bench/train_throughput.py --data "$WORK/data" --recipe photo128 --image-size 224 --images 1000 \
    --workers "$WORKERS" --out "$OUT/throughput.json"
step python train_hash.py --data "$WORK/data" --run "$WORK/run" --recipe photo128 --image-size 224 --resize-size 256 \
    --epochs "$EPOCHS" --eval-every 0 --workers "$WORKERS"
step python table1.py --runs "$WORK/run" --targets "$TARGET" --methods None Tri Tri+Adv CIBA --trigger-steps "$STEPS" \
    --workers "$WORKERS" --out "$OUT/table1"
cat "$OUT/table1/table1.md"
echo "gpu_check: done in $(( SECONDS - start )) s"
