"""Defenses against a run's backdoored model (the CIBA paper's appendix), adapted to deep hashing.

    python defend.py --run checkpoint/demo --backdoor ciba-t3-s4__confusing-t3-m60-e8-l0.8-b20-s20-seed0 \\
        --defense fine-pruning            # or --defense abl, --defense dp

fine-pruning (Liu et al., RAID 2018; defenses/fine_pruning.py). The defender holds --clean-images labelled clean
images: drawn with --seed among the database images that are not in the training list, so none of them is poisoned.
It ranks the channels of the backbone's last feature map (the last layer of the backbone whose output is a C x H x W
map) by their mean activation on those images and masks the most dormant ones. For every fraction of
--prune-fractions the pruned model, untrained, gives a point of the pruning curve: MAP of the clean queries and t-MAP
of the triggered non-target queries (evaluate.py's definitions, @--topk). Then the model pruned at --prune-fraction
is fine-tuned for --fine-tune-epochs on the defender's images with the clean run's loss, optimiser, learning rates,
batch size and augmentation, the pruned channels held at 0, and evaluated the same way. Writes
RUN/defense/fine-pruning__<backdoor>/: curve.json (reused when its settings and the backdoored checkpoint are the
same), curve.csv and curve.png, results.json, and the fine-tuning's config.json, checkpoint.pt, history.json, codes.pt.

abl (anti-backdoor learning, Li et al., NeurIPS 2021; defenses/abl.py). The defender trains the model on the
victim's poisoned list, from the victim's starting weights with its recipe: --isolation-epochs with the local
gradient ascent at --gamma, then isolates the --isolation-ratio of training images with the lowest per-image loss
(of the whole list, or of each class with --isolation-scope per-class, written to abl-per-class__<backdoor>/),
trains on the rest for --abl-epochs, and unlearns the isolated images by gradient ascent for --unlearn-epochs. The
per-image loss is image i's row of the hashing loss's pair matrix (defenses/abl.py says how). Writes
RUN/defense/abl__<backdoor>/: isolation/, training/, unlearning/ (each a training folder: --resume continues it),
isolation.json (per-image losses, the isolated images, precision, recall and AUROC for the poisoned images) and
results.json (MAP and t-MAP of the victim, before and after unlearning).

dp (Du et al., ICLR 2020; defenses/dp.py). The defender trains the model on the victim's poisoned list, from the
victim's starting weights with its recipe (--dp-epochs: other epochs), with DP-SGD steps: every image's gradient
clipped to --clip-norm, Gaussian noise of --noise-multiplier x --clip-norm added to their sum. The training images
with the highest per-image loss under that model are flagged as poisoned. Writes
RUN/defense/dp-n<noise>-c<clip>__<backdoor>/: the training folder (--resume continues it), detection.json (every
image's loss, the flagged images, AUROC and precision at M for the poisoned images) and results.json (MAP and t-MAP
of the victim and of the DP-trained model).

Every defense records its settings, seeds and provenance in results.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from defenses import load_victim
from defenses.abl import anti_backdoor_learning
from defenses.dp import dp_detection
from defenses.fine_pruning import fine_pruning
from retrieval import CONVENTIONS
from runs import UserError, add_deterministic_flag, cli_entry, make_deterministic, pick_device, require_at_least_one
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with a backdoored model (step 5)
BACKDOOR = None  # folder name under RUN/backdoor/ (step 5); None: the only one there
DEFENSE = "fine-pruning"  # "fine-pruning" | "abl" | "dp"
CLEAN_IMAGES = 500  # labelled clean images the defender holds (database images outside the training list)
PRUNE_FRACTIONS = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]  # the pruning curve
PRUNE_FRACTION = 0.8  # the fraction pruned before fine-tuning
FINE_TUNE_EPOCHS = 10  # fine-pruning: epochs of fine-tuning on the clean images after pruning
GAMMA = 0.5  # ABL: the loss level the local gradient ascent holds each image at (ABL's value)
ISOLATION_EPOCHS = 20  # ABL's T_te
ISOLATION_RATIO = 0.01  # ABL: the share of training images isolated (ABL's 1 %)
ISOLATION_SCOPE = "global"  # ABL: that share of the whole list ("global", ABL's) or of each class ("per-class")
ABL_EPOCHS = None  # ABL: epochs on the rest after isolation; None: the clean recipe's epochs less ISOLATION_EPOCHS
UNLEARN_EPOCHS = 5  # ABL: epochs of gradient ascent on the isolated images (the official code's 5)
NOISE_MULTIPLIER = 1.0  # DP: the Gaussian noise's standard deviation, in units of CLIP_NORM
CLIP_NORM = 1.0  # DP: the norm every image's gradient is clipped to
DP_EPOCHS = None  # DP: epochs of DP-SGD training; None: the clean recipe's
TOPK = 1000  # R of MAP@R and t-MAP@R
CONVENTION = "empty-zero"  # queries with no relevant item in the top R: "empty-zero" or "empty-skipped"
SEED = 0  # the defender's images
BATCH_SIZE = 256  # encoding
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
RESUME = False  # continue an interrupted defense from its checkpoint
OVERWRITE = False  # replace a finished defense

DEFENSES = ("fine-pruning", "abl", "dp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--backdoor", default=BACKDOOR)
    p.add_argument("--defense", default=DEFENSE, choices=DEFENSES)
    p.add_argument("--clean-images", type=int, default=CLEAN_IMAGES)
    p.add_argument("--prune-fractions", type=float, nargs="+", default=PRUNE_FRACTIONS)
    p.add_argument("--prune-fraction", type=float, default=PRUNE_FRACTION)
    p.add_argument("--fine-tune-epochs", type=int, default=FINE_TUNE_EPOCHS)
    p.add_argument("--gamma", type=float, default=GAMMA)
    p.add_argument("--isolation-epochs", type=int, default=ISOLATION_EPOCHS)
    p.add_argument("--isolation-ratio", type=float, default=ISOLATION_RATIO)
    p.add_argument("--isolation-scope", default=ISOLATION_SCOPE, choices=("global", "per-class"))
    p.add_argument("--abl-epochs", type=int, default=ABL_EPOCHS)
    p.add_argument("--unlearn-epochs", type=int, default=UNLEARN_EPOCHS)
    p.add_argument("--noise-multiplier", type=float, default=NOISE_MULTIPLIER)
    p.add_argument("--clip-norm", type=float, default=CLIP_NORM)
    p.add_argument("--dp-epochs", type=int, default=DP_EPOCHS)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--resume", default=RESUME, action="store_true")
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "clean_images", "fine_tune_epochs", "topk", "batch_size", "isolation_epochs",
                         "unlearn_epochs")
    for name in ("abl_epochs", "dp_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.noise_multiplier < 0:
        raise UserError(f"--noise-multiplier {args.noise_multiplier:g} is below 0; it is the noise's standard "
                        f"deviation in units of --clip-norm (0: clipping only)")
    if args.clip_norm <= 0:
        raise UserError(f"--clip-norm {args.clip_norm:g} must be above 0; it is the norm every image's gradient is "
                        f"clipped to")
    if not 0 < args.isolation_ratio < 1:
        raise UserError(f"--isolation-ratio {args.isolation_ratio:g} is outside (0, 1); it is the share of the "
                        f"training images that ABL isolates (ABL: 0.01)")
    if args.gamma < 0:
        raise UserError(f"--gamma {args.gamma:g} is below 0; it is the loss level the local gradient ascent holds "
                        f"each image at (0: plain training)")
    for fraction in (*args.prune_fractions, args.prune_fraction):
        if not 0 <= fraction <= 1:
            raise UserError(f"pruning fraction {fraction:g} is outside [0, 1]; it is the share of the last feature "
                            f"map's channels that is masked (--prune-fraction, --prune-fractions)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    device = pick_device(args.device)
    victim = load_victim(Path(args.run), args.backdoor, device)
    name = {"dp": f"dp-n{args.noise_multiplier:g}-c{args.clip_norm:g}",
            "abl": "abl" if args.isolation_scope == "global" else "abl-per-class"}.get(args.defense, args.defense)
    out = victim.run / "defense" / f"{name}__{victim.backdoor_dir.name}"
    if args.defense == "abl":
        return anti_backdoor_learning(victim, args, out, device)
    if args.defense == "dp":
        return dp_detection(victim, args, out, device)
    return fine_pruning(victim, args, out, device)


if __name__ == "__main__":
    cli_entry(main)
