"""Step 1: train the clean deep hashing model.

    python train_hash.py --data datasets/synthetic --run checkpoint/demo --recipe small32

Writes into RUN/clean/: config.json (every setting, seed and code version), checkpoint.pt (after every epoch,
atomically; --resume continues from it), history.json (loss and query-subset MAP per epoch) and codes.pt (codes and
labels of the training and database images).

Recipes set a group of defaults; a flag given explicitly wins over its recipe:
  paper    the CIBA paper's ImageNet setting (official code): VGG-11 pretrained on ImageNet, 224 px (resize 256,
           RandomResizedCrop 224, flip), pairwise loss, SGD momentum 0.9, weight decay 5e-4, batch 24,
           lr 1e-3 for the fully connected layers and the hash layer, 1e-4 for the convolutional features,
           constant rate, 200 epochs (the official train.py default).
  small32  32x32 images (CIFAR-10, the synthetic set) with the small backbone trained from scratch: random crop with
           4 px padding and flip, pairwise loss, Adam (lr 1e-3 for all layers, weight decay 1e-5), batch 32, cosine
           decay over 60 epochs. (Measured on the synthetic set: SGD at lr 0.02-0.1 and batch 64 moved the pairwise
           loss far more slowly than this; see README.)
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import make_loader, open_split
from models import ARCHS, LOSSES, build_loss, build_model
from models.hashnet import load_checkpoint
from retrieval import encode, mean_average_precision
from runs import (UserError, atomic_save, cli_entry, pick_device, provenance, read_json, require_at_least_one,
                  write_json)

DATA = "datasets/synthetic"  # folder holding train.txt, query.txt, database.txt (prepare_data.py writes them)
DATA_ROOT = None  # folder the list paths are relative to; None: the list folder
PREFIX_FROM = None  # rewrite this leading part of every list path ...
PREFIX_TO = ""  # ... to this (lists published with absolute paths of another machine)
RUN = "checkpoint/demo"  # run directory; this step writes RUN/clean/
RECIPE = "paper"  # "paper" or "small32": sets the defaults below as a group
ARCH = "vgg11"
PRETRAINED = True  # torchvision ImageNet weights for vgg11/resnet*
BITS = 48
LOSS = "pairwise"
PAIRWISE_NORM = "bits"  # pairwise loss divides u_i.u_j by K ("bits", paper) or the batch size ("batch", official code)
QUANT_WEIGHT = None  # weight of the loss's quantisation term; None: the loss's usual default
IMAGE_SIZE = 224
RESIZE_SIZE = 256
AUGMENT = "resized-crop"  # "resized-crop" | "pad-crop" | "none"
EPOCHS = 200
BATCH_SIZE = 24
LR = 1e-3  # fully connected layers and hash layer
LR_FEATURES = 1e-4  # convolutional features
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
OPTIMIZER = "sgd"  # "sgd" | "adam" (Adam ignores --momentum)
LR_SCHEDULE = "constant"  # "constant" | "cosine"
EVAL_EVERY = 10  # epochs between query-subset MAP evaluations (0: only at the end)
EVAL_QUERIES = 500  # size of the seeded query subset for the periodic MAP
TOPK = 1000
WORKERS = 4
SEED = 0
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
RESUME = False
OVERWRITE = False

RECIPES = {
    "paper": dict(arch="vgg11", pretrained=True, image_size=224, resize_size=256, augment="resized-crop",
                  epochs=200, batch_size=24, optimizer="sgd", lr=1e-3, lr_features=1e-4, momentum=0.9,
                  weight_decay=5e-4, lr_schedule="constant"),
    "small32": dict(arch="small", pretrained=False, image_size=32, resize_size=32, augment="pad-crop",
                    epochs=60, batch_size=32, optimizer="adam", lr=1e-3, lr_features=1e-3, momentum=0.9,
                    weight_decay=1e-5, lr_schedule="cosine"),
}
# Settings that shape the model or its training trajectory: --resume refuses a checkpoint made with others.
TRAJECTORY_KEYS = ("arch", "pretrained", "bits", "loss", "pairwise_norm", "quant_weight", "image_size",
                   "resize_size", "augment", "batch_size", "optimizer", "lr", "lr_features", "momentum", "weight_decay",
                   "lr_schedule", "seed", "n_classes")


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
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--resume", default=RESUME, action="store_true")
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    args = p.parse_args(argv)
    # the recipe supplies defaults; flags given on the command line keep their values
    p.set_defaults(**RECIPES[args.recipe])
    args = p.parse_args(argv)
    if args.arch not in ARCHS:
        raise UserError(f"unknown architecture {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.loss not in LOSSES:
        raise UserError(f"unknown loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    require_at_least_one(args, "epochs", "batch_size", "image_size", "resize_size", "topk")
    if args.resize_size < args.image_size:
        raise UserError(f"--resize-size {args.resize_size} is smaller than --image-size {args.image_size}")
    if args.lr <= 0 or args.lr_features < 0:
        raise UserError(f"learning rates must be positive, got --lr {args.lr} --lr-features {args.lr_features}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    out = Path(args.run) / "clean"
    ckpt_path = out / "checkpoint.pt"
    data_dir = os.path.abspath(args.data)
    split_kw = dict(data_root=args.data_root, prefix_from=args.prefix_from, prefix_to=args.prefix_to)
    train_set = open_split(data_dir, "train", args.image_size, args.resize_size, args.augment, **split_kw)
    n_classes = train_set.image_list.n_classes
    query_set = open_split(data_dir, "query", args.image_size, args.resize_size, n_classes=n_classes, **split_kw)
    database_set = open_split(data_dir, "database", args.image_size, args.resize_size, n_classes=n_classes,
                              **split_kw)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    config.update(data=data_dir, data_root=args.data_root and os.path.abspath(args.data_root),
                  n_classes=n_classes, stage="clean", protocol=read_protocol(data_dir),
                  counts={"train": len(train_set), "query": len(query_set), "database": len(database_set)})

    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.bits, args.pretrained).to(device)
    loss_fn = build_loss(args.loss, args.bits, n_classes, args.pairwise_norm, args.quant_weight).to(device)
    optimizer, scheduler = build_optimizer(model, args)
    start_epoch, history = 0, []
    if ckpt_path.exists() and not (args.resume or args.overwrite):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it or --overwrite to train from scratch")
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        check_resumable(ckpt, config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        loss_fn.load_state_dict(ckpt["loss"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        print(f"resuming {ckpt_path} after epoch {start_epoch}")
    elif args.overwrite:  # results of the model being replaced must not outlive it
        for stale in ("checkpoint.pt", "codes.pt", "history.json", "results.json"):
            (out / stale).unlink(missing_ok=True)
    eval_queries = query_subset(len(query_set), args.eval_queries, args.seed)
    config["eval_query_indices"] = eval_queries  # lines of query.txt (0-based) behind the periodic MAP
    config["provenance"] = provenance(device)
    write_json(config, out / "config.json")

    query_loader = make_loader(torch.utils.data.Subset(query_set, eval_queries), 256, args.workers)
    database_loader = make_loader(database_set, 256, args.workers)
    ckpt_id, database_codes = None, None
    for epoch in range(start_epoch, args.epochs):
        t0, database_codes = time.time(), None  # codes only ever belong to the current weights
        loss = train_one_epoch(model, loss_fn, optimizer, train_set, args, epoch, device)
        scheduler.step()
        record = {"epoch": epoch + 1, "loss": loss, "lr": optimizer.param_groups[1]["lr"]}
        last = epoch + 1 == args.epochs
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            result, database_codes = subset_map(model, query_loader, database_loader, args.topk, device)
            record.update(map=result["map"], map_empty_skipped=result["map_empty_skipped"])
        record["seconds"] = round(time.time() - t0, 2)
        history.append(record)
        ckpt_id = uuid.uuid4().hex
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "epoch": epoch + 1,
                     "history": history, "config": config, "checkpoint_id": ckpt_id}, ckpt_path)
        write_json(history, out / "history.json")
        map_text = f" map@{args.topk} {record['map']:.4f} ({len(eval_queries)} queries)" if "map" in record else ""
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} lr {record['lr']:.2e}{map_text} "
              f"{record['seconds']:.1f}s", flush=True)

    if ckpt_id is None:  # nothing left to train: the codes belong to the checkpoint on disk
        ckpt = load_checkpoint(ckpt_path, "cpu")
        ckpt_id = ckpt["checkpoint_id"]
        codes_path = out / "codes.pt"
        if codes_path.exists() and torch.load(codes_path, weights_only=False).get("checkpoint_id") == ckpt_id:
            print(f"{ckpt_path} already trained for {ckpt['epoch']} epochs; codes are up to date")
            return {"history": history, "codes": str(codes_path)}
    train_eval_set = open_split(data_dir, "train", args.image_size, args.resize_size, n_classes=n_classes, **split_kw)
    train_codes, train_labels = encode(model, make_loader(train_eval_set, 256, args.workers), device, "encode train")
    # the last epoch's evaluation already encoded the database with the final weights
    db_codes, db_labels = database_codes or encode(model, database_loader, device, "encode database")
    atomic_save({"train_codes": train_codes, "train_labels": train_labels, "database_codes": db_codes,
                 "database_labels": db_labels, "checkpoint_id": ckpt_id, "epoch": args.epochs}, out / "codes.pt")
    print(f"done: {out}/checkpoint.pt, codes of {len(train_codes)} training and {len(db_codes)} database images")
    return {"history": history, "codes": str(out / "codes.pt")}


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace):
    """Two parameter groups: convolutional features at --lr-features, the fully connected head and hash layer at
    --lr (Section 4.1 / official code: 1e-4 and 1e-3); SGD with momentum or Adam; constant or cosine schedule."""
    features, head = model.param_groups()
    groups = [{"params": features, "lr": args.lr_features}, {"params": head, "lr": args.lr}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_rate)
    return optimizer, scheduler


def constant_rate(epoch: int) -> float:
    return 1.0


def read_protocol(data_dir: str) -> dict | None:
    path = Path(data_dir) / "protocol.json"
    return read_json(path) if path.exists() else None


def check_resumable(ckpt: dict, config: dict, path: Path) -> None:
    """--resume continues only a checkpoint made with the same model and training settings."""
    saved = ckpt["config"]
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {config.get(k)!r} here" for k in TRAJECTORY_KEYS
             if saved.get(k) != config.get(k)]
    if saved.get("lr_schedule") == "cosine" and saved.get("epochs") != config.get("epochs"):
        diffs.append(f"--epochs {saved.get('epochs')} there, {config.get('epochs')} here (cosine schedule)")
    if diffs:
        raise UserError(f"cannot resume {path}: it was trained with other settings ({'; '.join(diffs)}); use the "
                        f"same settings, --overwrite to start over, or another --run")


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed every generator from (seed, epoch), so a run resumed at an epoch boundary repeats the same epochs."""
    epoch_seed = seed * 1_000_003 + epoch
    torch.manual_seed(epoch_seed)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed % 2 ** 32)
    return torch.Generator().manual_seed(epoch_seed)


def train_one_epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_set: torch.utils.data.Dataset, args: argparse.Namespace, epoch: int,
                    device: torch.device) -> float:
    generator = seed_epoch(args.seed, epoch)
    loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, generator=generator,
                         drop_last=len(train_set) > args.batch_size)
    model.train()
    total = torch.zeros((), device=device)
    steps = 0
    for images, labels, _ in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    mean = float(total) / max(steps, 1)
    if not math.isfinite(mean):
        raise UserError(f"the loss became {mean} in epoch {epoch + 1}; lower --lr (now {args.lr}) and rerun "
                        f"with --overwrite")
    return mean


def query_subset(n_queries: int, size: int, seed: int) -> list[int]:
    """A seeded subset of query indices (all of them when `size` >= the query count or `size` <= 0)."""
    if size <= 0 or size >= n_queries:
        return list(range(n_queries))
    return sorted(np.random.default_rng(seed).choice(n_queries, size, replace=False).tolist())


def subset_map(model: torch.nn.Module, query_loader, database_loader, topk: int,
               device: torch.device) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """MAP@R of the query subset against the whole database, and the database codes and labels it used."""
    q_codes, q_labels = encode(model, query_loader, device, "encode queries")
    db_codes, db_labels = encode(model, database_loader, device, "encode database")
    return mean_average_precision(q_codes.to(device), q_labels, db_codes, db_labels, topk), (db_codes, db_labels)


if __name__ == "__main__":
    cli_entry(main)
