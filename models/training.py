"""Training a hash model for steps 1 and 5: optimiser, seeded epochs, checkpoint every epoch, resume, codes.

Step 1 (train_hash.py) and step 5 (train_backdoor.py) run the same loop with the same recipe; only the training
list differs. `recipe` is a namespace with the attributes of train_hash.py's flags (epochs, batch_size, optimizer,
lr, lr_features, momentum, weight_decay, lr_schedule, seed, workers, eval_every, topk).
"""
from __future__ import annotations

import argparse
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from data import HashListDataset, make_loader
from data.cache import CACHE_MODES, DecodedImages, cache_bytes, resolve_cache
from models.hash_network import load_checkpoint
from retrieval import encode, mean_average_precision, saved_codes
from runs import UserError, atomic_save, claim, distributed, read_timing, weights_id, write_json, write_timing

# Settings that shape the model or its training trajectory: --resume refuses a checkpoint made with others.
TRAJECTORY_KEYS = ("arch", "head", "pretrained", "bits", "loss", "pairwise_norm", "quant_weight", "image_size",
                   "resize_size", "augment", "batch_size", "optimizer", "lr", "lr_features", "momentum", "weight_decay",
                   "lr_schedule", "seed", "n_classes")


SWITCH = ("auto", "on", "off")
# What "auto" means on the CPU, from bench/train_throughput.py on the 2-core development VM (docs/performance.md):
# the cache made epochs faster; channels-last batches did not for the small backbone, and did for EfficientNet-Lite0
# (324 against 297 images/s per epoch at 64 px); bfloat16 autocast was faster on that CPU but its speed depends on the
# CPU's bfloat16 support and it changes the numerics, so it stays opt-in (--amp on).
CPU_CHANNELS_LAST_ARCHS = ("efficientnet_lite0",)
CPU_CACHE = "memory"


def add_fast_path_flags(parser: argparse.ArgumentParser, amp: str, cache: str, channels_last: str) -> None:
    """The training fast path's switches (train_hash.py and train_backdoor.py); "auto" resolves per device."""
    parser.add_argument("--amp", default=amp, choices=SWITCH)  # help texts: the scripts' constants' comments
    parser.add_argument("--cache", default=cache, choices=("auto", *CACHE_MODES))
    parser.add_argument("--channels-last", default=channels_last, choices=SWITCH)


def resolve_fast_path(recipe: argparse.Namespace, device: torch.device, n_images: int) -> dict:
    """The switches of --amp, --cache, --channels-last for this device and training set; a cache that does not fit
    its memory is an error when asked for by name, and dropped (to host memory, then off) under auto."""
    cuda = device.type == "cuda"
    amp = recipe.amp == "on" or (recipe.amp == "auto" and cuda)
    channels_last = recipe.channels_last == "on" or (
        recipe.channels_last == "auto" and (cuda or recipe.arch in CPU_CHANNELS_LAST_ARCHS))
    n_bytes = cache_bytes(n_images, recipe.image_size, recipe.resize_size, recipe.augment)
    cache = resolve_cache(recipe.cache, n_bytes, device, CPU_CACHE)
    return {"amp": amp, "cache": cache, "channels_last": channels_last, "cache_bytes": n_bytes}


def build_optimizer(model: torch.nn.Module, recipe: argparse.Namespace):
    """Two parameter groups: convolutional features at lr_features, the fully connected head and hash layer at
    lr (Section 4.1 / official code: 1e-4 and 1e-3); SGD with momentum or Adam; constant or cosine schedule."""
    features, head = model.param_groups()
    groups = [{"params": features, "lr": recipe.lr_features}, {"params": head, "lr": recipe.lr}]
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.Adam(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_rate)
    return optimizer, scheduler


def constant_rate(epoch: int) -> float:
    return 1.0


def check_resumable(ckpt: dict, config: dict, path: Path) -> None:
    """--resume continues only a checkpoint made with the same model, training settings and training list."""
    saved = ckpt["config"]
    keys = TRAJECTORY_KEYS + tuple(k for k in ("poisoned", "augment_poison") if k in config or k in saved)
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {config.get(k)!r} here" for k in keys
             if saved.get(k) != config.get(k)]
    if saved.get("lr_schedule") == "cosine" and saved.get("epochs") != config.get("epochs"):
        diffs.append(f"--epochs {saved.get('epochs')} there, {config.get('epochs')} here (cosine schedule)")
    if saved.get("poisoned_id", config.get("poisoned_id")) != config.get("poisoned_id"):  # (older runs: no id)
        diffs.append(f"the poisoned set {config.get('poisoned')} was made again since (content "
                     f"{saved['poisoned_id']} there, {config['poisoned_id']} now)")
    if diffs:
        raise UserError(f"cannot resume {path}: it was trained with other settings ({'; '.join(diffs)}); use the "
                        f"same settings, --overwrite to start over, or another --run")


def seed_epoch(seed: int, epoch: int, process: int = 0) -> torch.Generator:
    """Seed every generator from (seed, epoch), so a run resumed at an epoch boundary repeats the same epochs.

    The returned generator (batch order, cached augmentation) is the same in every process of a distributed run; the
    global generators (dropout, DataLoader workers) differ per process rank `process`."""
    epoch_seed = seed * 1_000_003 + epoch
    own_seed = epoch_seed + 7_919 * process
    torch.manual_seed(own_seed)
    random.seed(own_seed)
    np.random.seed(own_seed % 2 ** 32)
    return torch.Generator().manual_seed(epoch_seed)


def train_one_epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_set: Dataset, recipe: argparse.Namespace, epoch: int, device: torch.device,
                    fast: dict | None = None, cache: DecodedImages | None = None,
                    step: Callable | None = None) -> float:
    """One epoch in the seeded order of (seed, epoch); `fast` from resolve_fast_path (None: plain fp32), batches
    from `cache` when given (its own seeded order and batched augmentation), else from a DataLoader. Under torchrun
    each process takes its share of every global batch (runs.distributed). `step`: the update, training_step's
    signature (None: training_step; defend.py's DP-SGD gives its own)."""
    fast = fast or {"amp": False, "channels_last": False}
    process, world = distributed.rank(), distributed.world_size()
    generator = seed_epoch(recipe.seed, epoch, process)
    drop_last = len(train_set) > recipe.batch_size
    n_batches = len(train_set) // recipe.batch_size if drop_last else -(-len(train_set) // recipe.batch_size)
    if cache is not None:
        batches = cache.batches(torch.randperm(len(train_set), generator=generator), recipe.batch_size, drop_last,
                                generator, device, share=(process, world))
    elif world > 1:
        order = torch.randperm(len(train_set), generator=generator)
        share = recipe.batch_size // world
        shares = [order[start + process * share:start + (process + 1) * share].tolist()
                  for start in range(0, n_batches * recipe.batch_size, recipe.batch_size)]
        loader = make_loader(train_set, share, recipe.workers, batch_sampler=shares)
        batches = ((images, labels) for images, labels, _ in loader)
    else:
        loader = make_loader(train_set, recipe.batch_size, recipe.workers, shuffle=True, generator=generator,
                             drop_last=drop_last)
        batches = ((images, labels) for images, labels, _ in loader)
    layout = torch.channels_last if fast["channels_last"] else torch.preserve_format
    model.train()
    total = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)  # the first step whose loss is NaN or inf, kept on the device
    steps = 0
    for images, labels in tqdm(batches, desc=f"epoch {epoch + 1}", total=n_batches, leave=False,
                               disable=None if distributed.is_main_process() else True):
        images = images.to(device, non_blocking=True, memory_format=layout)
        loss = (step or training_step)(model, loss_fn, optimizer, images, labels.to(device, non_blocking=True),
                                       fast["amp"])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), steps + 1, first_bad)
        total += loss
        steps += 1
    if int(first_bad) > 0:
        raise UserError(f"the loss became NaN or inf in epoch {epoch + 1} at step {int(first_bad)} of {steps}; the "
                        f"checkpoint keeps the last finite epoch. Lower --lr (now {recipe.lr}) and rerun with "
                        f"--overwrite")
    return float(total) / max(steps, 1)


def training_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  images: torch.Tensor, labels: torch.Tensor, amp: bool) -> torch.Tensor:
    """Forward (bfloat16 autocast when `amp`), the loss in float32 on the global batch (all processes' outputs under
    torchrun), backward, optimiser step; the detached loss (no host synchronisation)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(images)
    outputs, labels = distributed.gather_batch(outputs.float(), labels)
    loss = loss_fn(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    world = distributed.world_size()
    (loss * world if world > 1 else loss).backward()  # DDP averages over processes; see gather_batch
    optimizer.step()
    return loss.detach()


def distributed_model(model: torch.nn.Module, recipe: argparse.Namespace, n_train: int,
                      device: torch.device) -> torch.nn.Module:
    """DDP around the model (batch norm synchronised across processes on CUDA; gloo on the CPU has no synchronised
    batch norm, so each process normalises its share of the batch), after checking the batch splits evenly."""
    world = distributed.world_size()
    if recipe.batch_size % world:
        raise UserError(f"--batch-size {recipe.batch_size} does not split over {world} processes; use a multiple "
                        f"of {world} or another --nproc_per_node")
    if n_train <= recipe.batch_size:
        raise UserError(f"the training list has {n_train} images, not more than one batch of {recipe.batch_size}; "
                        f"train it in one process")
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


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


def fit(model: torch.nn.Module, loss_fn: torch.nn.Module, recipe: argparse.Namespace, train_set: Dataset,
        query_set: Dataset, database_set: Dataset, out: Path, config: dict, device: torch.device, resume: bool,
        overwrite: bool, train_eval_set: Dataset | None = None,
        epoch_hook: Callable[[torch.nn.Module], dict] | None = None, step: Callable | None = None) -> dict:
    """Train for recipe.epochs into `out`: config.json, checkpoint.pt (every epoch, atomically), history.json (and
    the seconds of every epoch in history.timing.json), then codes.pt with the database codes (and the training codes
    when `train_eval_set` is given).

    A checkpoint already in `out` is an error unless `resume` (continue it; settings must match) or `overwrite`.
    The periodic MAP uses recipe.eval_queries seeded queries against the whole database. `epoch_hook(model)`, when
    given, runs after every epoch and its entries join the epoch's record in history.json (step 5's trigger
    distance). `step` replaces training_step (train_one_epoch). Under torchrun every process trains (DDP) and only
    rank 0 evaluates and writes.
    """
    # another process training the same model (rank 0 of each): wait for it, then continue or reuse what it made
    with claim(out) if distributed.is_main_process() else nullcontext():
        ckpt_path = out / "checkpoint.pt"
        main_process, world = distributed.is_main_process(), distributed.world_size()
        train_model = model
        if world > 1:
            train_model = distributed_model(model, recipe, len(train_set), device)
        optimizer, scheduler = build_optimizer(model, recipe)
        start_epoch, history, epoch_seconds = 0, [], []
        if ckpt_path.exists() and not (resume or overwrite):
            raise UserError(f"{ckpt_path} exists; pass --resume to continue it or --overwrite to train from scratch")
        if resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, device)
            check_resumable(ckpt, config, ckpt_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loss_fn.load_state_dict(ckpt["loss"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            epoch_seconds = read_timing(out / "history.json").get("epoch_seconds", [])[:start_epoch]
            epoch_seconds += [None] * (start_epoch - len(epoch_seconds))  # killed before an epoch's time was written
            if main_process:
                print(f"resuming {ckpt_path} after epoch {start_epoch}")
        elif overwrite and main_process:  # results of the model being replaced must not outlive it
            for stale in ("checkpoint.pt", "codes.pt", "history.json", "history.timing.json", "results.json",
                          "results.timing.json"):
                (out / stale).unlink(missing_ok=True)
        fast = resolve_fast_path(recipe, device, len(train_set))
        config["fast_path"] = fast
        eval_queries = query_subset(len(query_set), recipe.eval_queries, recipe.seed)
        config["eval_query_indices"] = eval_queries  # lines of query.txt (0-based) behind the periodic MAP
        config["processes"] = world
        # a finished training keeps the record of the code and command that trained it
        if main_process and (start_epoch < recipe.epochs or not (out / "config.json").exists()):
            write_json(config, out / "config.json")

        query_loader = make_loader(Subset(query_set, eval_queries), 256, recipe.workers)
        database_loader = make_loader(database_set, 256, recipe.workers)
        ckpt_id, database_codes, cache = None, None, None
        if start_epoch < recipe.epochs and fast["cache"] != "off" and isinstance(train_set, HashListDataset):
            t0 = time.time()
            store = device if fast["cache"] == "device" else torch.device("cpu")
            cache = DecodedImages(train_set, recipe.image_size, recipe.resize_size, recipe.augment, store,
                                  recipe.workers)
            if main_process:
                print(f"decoded {len(cache)} training images into {fast['cache_bytes'] / 2 ** 20:.0f} MiB on {store} "
                      f"in {time.time() - t0:.1f}s", flush=True)
        for epoch in range(start_epoch, recipe.epochs):
            t0, database_codes = time.time(), None  # codes only ever belong to the current weights
            loss = train_one_epoch(train_model, loss_fn, optimizer, train_set, recipe, epoch, device, fast, cache,
                                   step)
            scheduler.step()
            record = {"epoch": epoch + 1, "loss": loss, "lr": optimizer.param_groups[1]["lr"]}
            history.append(record)
            if not main_process:
                continue
            last = epoch + 1 == recipe.epochs
            if last or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0):
                result, database_codes = subset_map(model, query_loader, database_loader, recipe.topk, device)
                record.update(map=result["map"], map_empty_skipped=result["map_empty_skipped"])
            if epoch_hook is not None:
                record.update(epoch_hook(model))
            epoch_seconds.append(round(time.time() - t0, 2))
            state = model.state_dict()
            ckpt_id = weights_id(state)
            atomic_save({"model": state, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "epoch": epoch + 1,
                         "history": history, "config": config, "checkpoint_id": ckpt_id}, ckpt_path)
            write_timing(out / "history.json", {"epoch_seconds": epoch_seconds})
            write_json(history, out / "history.json")
            map_text = (f" map@{recipe.topk} {record['map']:.4f} ({len(eval_queries)} queries)" if "map" in record
                        else "")
            print(f"epoch {epoch + 1}/{recipe.epochs} loss {loss:.4f} lr {record['lr']:.2e}{map_text} "
                  f"{epoch_seconds[-1]:.1f}s", flush=True)

        codes_path = out / "codes.pt"
        if not main_process:
            return {"history": history, "out": str(out), "epoch_seconds": epoch_seconds}
        if ckpt_id is None:  # nothing left to train: the codes belong to the checkpoint on disk
            ckpt = load_checkpoint(ckpt_path, "cpu")
            ckpt_id = ckpt["checkpoint_id"]
            if saved_codes(codes_path, ckpt_id) is not None:
                print(f"{ckpt_path} already trained for {ckpt['epoch']} epochs; codes are up to date")
                return {"history": history, "codes": str(codes_path), "out": str(out), "checkpoint_id": ckpt_id,
                        "epoch_seconds": epoch_seconds}
            model.load_state_dict(ckpt["model"])
        codes = {"checkpoint_id": ckpt_id, "epoch": recipe.epochs}
        if train_eval_set is not None:
            train_loader = make_loader(train_eval_set, 256, recipe.workers)
            codes["train_codes"], codes["train_labels"] = encode(model, train_loader, device, "encode train")
        # the last epoch's evaluation already encoded the database with the final weights
        codes["database_codes"], codes["database_labels"] = (
            database_codes or encode(model, database_loader, device, "encode database"))
        atomic_save(codes, codes_path)
        extra = f"{len(codes['train_codes'])} training and " if train_eval_set is not None else ""
        print(f"done: {ckpt_path}, codes of {extra}{len(codes['database_codes'])} database images")
        return {"history": history, "codes": str(codes_path), "out": str(out), "checkpoint_id": ckpt_id,
                "epoch_seconds": epoch_seconds}
