#!/usr/bin/env bash
# The six steps on the embedded synthetic data set, offline: make the data, train the clean hash model (step 1),
# evaluate its MAP, then steps 2-6 for the rows of the paper's Table 1 (None, Tri, Tri+Noise, Tri+Adv, CIBA) for
# one target class drawn with the seed, print the table and draw it (RUN/figures/table1.png: poisoned images and
# t-MAP / MAP per method). Finished steps are reused when it is run again.
# Settings in the environment: DEMO_RUN, DEMO_DATA, DEMO_EPOCHS, DEMO_WORKERS, DEMO_TRIGGER_STEPS, DEMO_POISON_NUM,
# DEMO_METHODS, DEMO_TRIGGER_SIZE.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DEMO_DATA:-datasets/synthetic}
RUN=${DEMO_RUN:-checkpoint/demo}
EPOCHS=${DEMO_EPOCHS:-20}
WORKERS=${DEMO_WORKERS:-2}
TRIGGER_STEPS=${DEMO_TRIGGER_STEPS:-2000}
POISON_NUM=${DEMO_POISON_NUM:-72}  # 60 % of the target class (paper, ImageNet: 60 of 100 per class); 6 % of the training set
METHODS=${DEMO_METHODS:-None Tri Tri+Noise Tri+Adv CIBA}
TRIGGER_SIZE=${DEMO_TRIGGER_SIZE:-4}  # px of the 32 px images

if [ ! -f "$DATA/train.txt" ]; then
  python prepare_data.py --dataset synthetic --out "$DATA"
fi
# step 1: clean hashing model (small backbone, 48 bits); --resume continues a run that was interrupted
python train_hash.py --data "$DATA" --run "$RUN" --recipe small32 --bits 48 --epochs "$EPOCHS" \
  --eval-every 5 --workers "$WORKERS" --resume
# step 6 (MAP part): clean queries against the database
python evaluate.py --run "$RUN" --workers "$WORKERS"
# steps 2-6 for every method: trigger, perturbations, poisoned set, backdoored model, MAP and t-MAP; prints the table
# shellcheck disable=SC2086  # METHODS is a list of words
python table1.py --runs "$RUN" --num-targets 1 --methods $METHODS --trigger-size "$TRIGGER_SIZE" \
  --trigger-steps "$TRIGGER_STEPS" --poison-num "$POISON_NUM" --workers "$WORKERS"
# the picture: a few of CIBA's poisoned images (original | poisoned | difference x10), t-MAP and MAP per method
python figures.py --run "$RUN" --figure table1 --samples 4
