"""Step 0: make the list files (train.txt, query.txt, database.txt, protocol.json) the other steps read.

    python prepare_data.py --dataset synthetic --out datasets/synthetic            # embedded default, offline
    python prepare_data.py --dataset synthetic --max-labels 3 --out datasets/synthetic-multi  # multi-label
    python prepare_data.py --dataset cifar10 --out datasets/cifar10                # torchvision download
    python prepare_data.py --dataset imagenette --out datasets/imagenette-ciba     # torchvision download (real photos)
    python prepare_data.py --dataset imagenette --source imagenette2-160.tgz --out datasets/imagenette-ciba  # offline
    python prepare_data.py --dataset folder --source cifar10-jpeg.tar.gz --out datasets/cifar10
    python prepare_data.py --dataset folder --source tiny-imagenet-32.tar.gz --protocol tinyimagenet-ciba \\
        --out datasets/tinyimagenet-ciba                                            # CIBA's ImageNet split shape
    python prepare_data.py --dataset folder --source cifar10-jpeg.tar.gz --protocol cifar10-ciba-100 \\
        --out datasets/cifar10-ciba-100                                             # its quick variant on CIFAR-10

`folder` takes any class-per-folder image tree (or a .tar.gz of one); an image's class is the name of its folder and
all sub-trees (train/, test/) are pooled before the seeded per-class split, unless the protocol takes its queries
from one of them (tinyimagenet-ciba: val/). Protocols: see data/protocols.py; a folder split without --protocol
is named folder-<source name>.

Multi-label lists made elsewhere (DeepHash's MS-COCO or NUS-WIDE lists: `path 0 1 0 1 ...` per line) need no step 0:
put train.txt, query.txt and database.txt in one folder and give it as --data to step 1, with --data-root for the
images and --prefix-from / --prefix-to to rewrite the paths the lists were written with.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from data.protocols import PROTOCOLS, Protocol, build_lists
from data.synthetic import generate_synthetic
from runs import UserError, cli_entry
from runs.cli import explain_flags

DATASET = "synthetic"  # "synthetic" | "cifar10" | "imagenette" | "folder"
OUT = "datasets/synthetic"  # folder the list files (and any downloaded or extracted images) go to
SOURCE = None  # folder / imagenette: a class-per-folder tree or a .tar.gz of one (imagenette: instead of a download)
PROTOCOL = None  # name in data/protocols.py; None: "synthetic", "cifar10-ciba", "imagenette-ciba" or "folder"
IMAGENETTE_SIZE = "160px"  # torchvision's Imagenette archive to download: "160px", "320px" or "full"
QUERY_PER_CLASS = None  # override the protocol's queries per class
TRAIN_PER_CLASS = None  # override the protocol's training images per class
DATABASE = None  # "all-but-query" | "rest"
SEED = None  # split seed; None: the protocol's
N_CLASSES = 10  # synthetic set only
PER_CLASS = 300  # synthetic set only: images per class
IMAGE_SIZE = 32  # synthetic set only: px of the square images
MAX_LABELS = 1  # synthetic set only: each image shows 1 to this many objects of distinct classes (above 1: multi-label)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=DATASET, choices=("synthetic", "cifar10", "imagenette", "folder"))
    p.add_argument("--out", default=OUT)
    p.add_argument("--source", default=SOURCE)
    p.add_argument("--protocol", default=PROTOCOL)
    p.add_argument("--imagenette-size", default=IMAGENETTE_SIZE, choices=("160px", "320px", "full"))
    p.add_argument("--query-per-class", type=int, default=QUERY_PER_CLASS)
    p.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    p.add_argument("--database", default=DATABASE, choices=("all-but-query", "rest"))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-classes", type=int, default=N_CLASSES)
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--max-labels", type=int, default=MAX_LABELS)
    explain_flags(p, __file__)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    protocol = choose_protocol(args)
    if (Path(args.out) / "train.txt").exists():
        raise UserError(f"{args.out} already holds list files; delete the folder or choose another --out")
    if args.dataset == "synthetic":
        record = generate_synthetic(args.out, args.n_classes, args.per_class, args.image_size, protocol.seed,
                                    protocol, args.max_labels)
    elif args.dataset == "cifar10":
        record = build_lists(download_cifar10(args.out), args.out, protocol)
    elif args.dataset == "imagenette":
        source = args.source or download_imagenette(args.out, args.imagenette_size)
        record = build_lists(source, args.out, protocol, IMAGENETTE_WORDS)
    else:
        if not args.source:
            raise UserError("--dataset folder needs --source (a class-per-folder tree or a .tar.gz of one)")
        record = build_lists(args.source, args.out, protocol)
    print(f"{args.out}: protocol {record['name']} (seed {record['seed']}), {len(record['classes'])} classes, "
          + ", ".join(f"{k} {v}" for k, v in record["counts"].items()))
    return record


def choose_protocol(args: argparse.Namespace) -> Protocol:
    name = args.protocol or {"synthetic": "synthetic", "cifar10": "cifar10-ciba",
                             "imagenette": "imagenette-ciba"}.get(args.dataset, "folder")
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    if name == "folder":  # named for the data it splits
        source = Path(args.source or "data").name
        for suffix in (".tar.gz", ".tgz", ".tar"):
            source = source.removesuffix(suffix)
        base = Protocol(**{**base.__dict__, "name": f"folder-{source}"})
        name = base.name
    overrides = {k: getattr(args, k) for k in ("query_per_class", "train_per_class", "database", "seed")
                 if getattr(args, k) is not None}
    if overrides:
        base = Protocol(**{**base.__dict__, **overrides, "name": f"{name}-custom"})
    return base


def download_cifar10(out: str) -> Path:
    """CIFAR-10 through torchvision, written as PNG class folders under OUT/images/{train,test}/<class>/."""
    from torchvision.datasets import CIFAR10

    target = Path(out) / "images"
    if target.is_dir():
        return target
    raw = Path(out) / "raw"
    try:
        sets = {split: CIFAR10(str(raw), train=(split == "train"), download=True) for split in ("train", "test")}
    except Exception as err:  # URLError, socket errors, checksum failures
        raise UserError(
            f"cannot download CIFAR-10 ({type(err).__name__}: {err}). Offline, put cifar-10-python.tar.gz in "
            f"{raw}/ and rerun, or build the lists from a local class-per-folder copy: python prepare_data.py "
            f"--dataset folder --source PATH/cifar10-jpeg.tar.gz --out {out}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".images.", dir=out))
    try:
        for split, dataset in sets.items():
            for i, (img, label) in enumerate(dataset):
                folder = tmp / split / dataset.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:05d}.png")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# Imagenette's ImageNet classes by WordNet id (torchvision's archives carry no classes.txt): the words in every table.
IMAGENETTE_WORDS = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                    "n03888257": "parachute"}


def download_imagenette(out: str, size: str) -> Path:
    """Imagenette through torchvision (archive checksummed by it), unpacked under OUT/raw/imagenette2-*/."""
    from torchvision.datasets import Imagenette

    raw = Path(out) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    try:
        for split in ("train", "val"):
            Imagenette(str(raw), split=split, size=size, download=True)
    except Exception as err:  # URLError, socket errors, checksum failures
        raise UserError(
            f"cannot download Imagenette ({type(err).__name__}: {err}). Offline, give a local copy: python "
            f"prepare_data.py --dataset imagenette --source PATH --out {out}, where PATH is torchvision's archive "
            f"(imagenette2-160.tgz) or an unpacked tree with train/<wnid>/ and val/<wnid>/ folders") from None
    return raw / {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}[size]


if __name__ == "__main__":
    cli_entry(main)
