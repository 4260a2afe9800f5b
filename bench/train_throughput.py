"""Benchmark: training throughput (images/s) of steps 1 and 5, the plain fp32 DataLoader path against the fast path
(--amp, --cache, --channels-last of train_hash.py / train_backdoor.py), with what limits each.

    python bench/train_throughput.py                                   # small backbone, 32 px (the small32 recipe)
    python bench/train_throughput.py --arch vgg11 --recipe paper --images 1536
    python bench/train_throughput.py --data datasets/cifar10 --images 4096

Both paths run models.training.train_one_epoch, the loop the scripts run, on the first --images entries of the
training list (--data, or a synthetic set of --synthetic-size px images made in a temporary folder), after one untimed
warm-up epoch. Beside each full epoch it times the two halves alone: the input pipeline (every batch made and moved to
the device, no network) and the training step (forward, loss, backward, optimiser on one batch already on the device,
with the same autocast and layout). Whichever is slower is what limits the epoch. Writes JSON with --out.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import HashListDataset, ImageList, image_transform, make_loader, open_split  # noqa: E402
from data.cache import DecodedImages  # noqa: E402
from data.protocols import Protocol  # noqa: E402
from data.synthetic import generate_synthetic  # noqa: E402
from models import build_loss, build_model  # noqa: E402
from models.hash_network import HEAD_NAMES, resolve_head  # noqa: E402
from models.training import (SWITCH, build_optimizer, resolve_fast_path, seed_epoch,  # noqa: E402
                             train_one_epoch, training_step)
from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, require_at_least_one, write_json  # noqa: E402
from train_hash import RECIPES  # noqa: E402

from bench.timing import bench_device, stopwatch, synchronize, timed  # noqa: E402

ARCH = None  # None: the recipe's
HEAD = None  # None: the recipe's (or the architecture's own)
RECIPE = "small32"  # train_hash.py recipe for architecture, image size, augmentation, batch size and optimiser
IMAGE_SIZE = None  # None: the recipe's
BITS = 48  # code length
IMAGES = 2048  # training images per epoch
EPOCHS = 2  # timed epochs per path (after one warm-up epoch)
STEP_REPEATS = 20  # timed training steps on a fixed batch (after 3 warm-up ones)
DATA = None  # a prepared data folder; None: a synthetic set in a temporary folder
SYNTHETIC_SIZE = 32  # px of the synthetic images (the paper recipe resizes them to 256, then crops 224)
WORKERS = 4  # data-loading processes
AMP = "auto"  # bfloat16 autocast of the fast path: "auto" (on CUDA), "on", "off"
CACHE = "auto"  # decoded training images of the fast path: "auto", "off", "memory", "device"
CHANNELS_LAST = "auto"  # channels-last batches of the fast path: "auto", "on", "off"
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # weights and batches
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH)
    p.add_argument("--head", default=HEAD, choices=HEAD_NAMES)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--recipe", default=RECIPE, choices=sorted(RECIPES))
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--images", type=int, default=IMAGES)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--step-repeats", type=int, default=STEP_REPEATS)
    p.add_argument("--data", default=DATA)
    p.add_argument("--synthetic-size", type=int, default=SYNTHETIC_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--amp", default=AMP, choices=SWITCH)
    p.add_argument("--cache", default=CACHE, choices=("auto", "off", "memory", "device"))
    p.add_argument("--channels-last", default=CHANNELS_LAST, choices=SWITCH)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "bits", "images", "epochs", "step_repeats", "synthetic_size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    recipe = argparse.Namespace(**RECIPES[args.recipe], seed=args.seed, workers=args.workers,
                                amp=args.amp, cache=args.cache, channels_last=args.channels_last)
    if args.image_size:  # the recipe's source size follows (resize size = image size x the recipe's ratio)
        recipe.resize_size = round(args.image_size * recipe.resize_size / recipe.image_size)
        recipe.image_size = args.image_size
    recipe.arch = args.arch or recipe.arch
    same_arch = recipe.arch == RECIPES[args.recipe]["arch"]
    recipe.head = args.head or (RECIPES[args.recipe].get("head") if same_arch else None)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_synthetic(Path(tmp) / "synthetic", args)
        train_set = first_images(data, recipe, args.images)
        fast = resolve_fast_path(recipe, device, len(train_set))
        plain = {"amp": False, "cache": "off", "channels_last": False}
        rows = {name: measure(name, switches, train_set, recipe, args, device)
                for name, switches in (("plain", plain), ("fast", fast))}
    base, quick = rows["plain"], rows["fast"]
    print(f"\n{recipe.arch} ({resolve_head(recipe.arch, recipe.head)} head), {recipe.image_size} px, batch {recipe.batch_size}, {len(train_set)} images, {device}, "
          f"{torch.get_num_threads()} threads, {args.workers} workers; fast path: amp {fast['amp']}, cache "
          f"{fast['cache']}, channels-last {fast['channels_last']}")
    print("| path | epoch (images/s) | input pipeline alone (images/s) | training step alone (images/s) | "
          "limited by |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['epoch_images_per_s']:.0f} | {r['pipeline_images_per_s']:.0f} | "
              f"{r['step_images_per_s']:.0f} | {r['limited_by']} |")
    print(f"fast / plain: x{quick['epoch_images_per_s'] / base['epoch_images_per_s']:.2f}")
    record = {"settings": vars(args), "recipe": vars(recipe), "threads": torch.get_num_threads(), "fast_path": fast,
              "rows": rows, "speedup": quick["epoch_images_per_s"] / base["epoch_images_per_s"],
              "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def make_synthetic(folder: Path, args: argparse.Namespace) -> str:
    """10 classes, --images / 10 training images each (and one query each, which the benchmark does not use)."""
    per_class = -(-args.images // 10)
    generate_synthetic(folder, n_classes=10, per_class=per_class + 1, size=args.synthetic_size, seed=args.seed,
                       protocol=Protocol("bench", query_per_class=1, train_per_class=per_class))
    return str(folder)


def first_images(data: str, recipe: argparse.Namespace, n: int) -> HashListDataset:
    full = open_split(data, "train", recipe.image_size, recipe.resize_size, recipe.augment)
    if len(full) < n:
        raise UserError(f"{full.image_list.list_file} has {len(full)} training images; --images {n} asks for more")
    lst = full.image_list
    subset = ImageList(lst.list_file, lst.paths[:n], lst.labels[:n], lst.line_numbers[:n])
    return HashListDataset(subset, image_transform(recipe.image_size, recipe.resize_size, recipe.augment))


def measure(name: str, fast: dict, train_set: HashListDataset, recipe: argparse.Namespace, args: argparse.Namespace,
            device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(recipe.arch, args.bits, False, recipe.head, recipe.image_size).to(device)
    loss_fn = build_loss("pairwise", args.bits, train_set.image_list.n_classes).to(device)
    optimizer, _ = build_optimizer(model, recipe)
    cache, cache_seconds = None, 0.0
    if fast["cache"] != "off":
        store = device if fast["cache"] == "device" else torch.device("cpu")
        cache, cache_seconds = stopwatch(lambda: DecodedImages(train_set, recipe.image_size, recipe.resize_size,
                                                               recipe.augment, store, recipe.workers), device)
    epoch = lambda e: train_one_epoch(model, loss_fn, optimizer, train_set, recipe, e, device, fast, cache)  # noqa
    epoch(0)  # warm-up
    _, seconds = stopwatch(lambda: [epoch(e) for e in range(1, args.epochs + 1)], device)
    n_seen = args.epochs * (len(train_set) // recipe.batch_size) * recipe.batch_size
    pipeline_seconds, pipeline_images = time_pipeline(train_set, recipe, cache, device)
    step_ms = time_step(model, loss_fn, optimizer, train_set, recipe, fast, device, args.step_repeats)
    row = {"epoch_images_per_s": n_seen / seconds, "epoch_seconds": seconds / args.epochs,
           "pipeline_images_per_s": pipeline_images / pipeline_seconds,
           "step_images_per_s": recipe.batch_size / step_ms * 1000, "step_ms": step_ms,
           "cache_seconds": cache_seconds, "switches": fast}
    row["limited_by"] = "input pipeline" if row["pipeline_images_per_s"] < row["step_images_per_s"] else "compute"
    print(f"{name}: {row['epoch_images_per_s']:.0f} images/s per epoch, pipeline alone "
          f"{row['pipeline_images_per_s']:.0f}, step alone {row['step_images_per_s']:.0f}"
          + (f", cache built in {cache_seconds:.1f}s" if cache is not None else ""), flush=True)
    return row


def time_pipeline(train_set: HashListDataset, recipe: argparse.Namespace, cache: DecodedImages | None,
                  device: torch.device) -> tuple[float, int]:
    """(seconds, images) to make one epoch's batches on the device, as train_one_epoch gets them, without the
    network."""
    generator = seed_epoch(recipe.seed, 0)
    start = time.perf_counter()
    if cache is not None:
        batches = cache.batches(torch.randperm(len(train_set), generator=generator), recipe.batch_size, True,
                                generator, device)
    else:
        loader = make_loader(train_set, recipe.batch_size, recipe.workers, shuffle=True, generator=generator,
                             drop_last=True)
        batches = ((images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                   for images, labels, _ in loader)
    made = sum(len(images) for images, _ in batches)
    synchronize(device)
    return time.perf_counter() - start, made


def time_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
              train_set: HashListDataset, recipe: argparse.Namespace, fast: dict, device: torch.device,
              repeats: int) -> float:
    """Milliseconds per training step on one fixed batch already on the device."""
    layout = torch.channels_last if fast["channels_last"] else torch.contiguous_format
    images = torch.rand(recipe.batch_size, 3, recipe.image_size, recipe.image_size, device=device)
    images = images.contiguous(memory_format=layout)
    labels = train_set.labels[:recipe.batch_size].to(device)

    return timed(lambda: training_step(model, loss_fn, optimizer, images, labels, fast["amp"]), repeats,
                 min(3, repeats), device)


if __name__ == "__main__":
    cli_entry(main)
