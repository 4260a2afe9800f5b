#!/usr/bin/env bash
# The main job on the embedded synthetic data set, offline: make the data, train the clean hash model (step 1),
# evaluate its MAP (step 6). Settings: DEMO_RUN, DEMO_DATA, DEMO_EPOCHS, DEMO_WORKERS in the environment.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DEMO_DATA:-datasets/synthetic}
RUN=${DEMO_RUN:-checkpoint/demo}
EPOCHS=${DEMO_EPOCHS:-20}
WORKERS=${DEMO_WORKERS:-2}

if [ ! -f "$DATA/train.txt" ]; then
  python prepare_data.py --dataset synthetic --out "$DATA"
fi
# step 1: clean hashing model (small backbone, 48 bits); --resume continues a run that was interrupted
python train_hash.py --data "$DATA" --run "$RUN" --recipe small32 --bits 48 --epochs "$EPOCHS" \
  --eval-every 5 --workers "$WORKERS" --resume
# step 6 (MAP part): clean queries against the database
python evaluate.py --run "$RUN" --workers "$WORKERS"
