"""Seeded per-class splits of a class-per-folder image tree into train / query / database list files.

A protocol is (queries per class, training images per class, what the database holds, seed). The database is either
every image that is not a query ("all-but-query", CIBA's and the common CIFAR-10 convention: training images are in
the database) or only the images in neither split ("rest").
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.lists import write_list
from runs.errors import UserError
from runs.io import write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLITS = ("train", "query", "database")


@dataclass(frozen=True)
class Protocol:
    name: str
    query_per_class: int
    train_per_class: int
    database: str = "all-but-query"
    seed: int = 0


PROTOCOLS = {
    # CIBA's CIFAR-10 protocol: pool all 60,000 images; per class 100 queries and 1,000 training images.
    "cifar10-ciba": Protocol("cifar10-ciba", query_per_class=100, train_per_class=1000),
    # The embedded synthetic set (data/synthetic.py): 300 images per class.
    "synthetic": Protocol("synthetic", query_per_class=30, train_per_class=120),
}


def find_class_images(tree: str | os.PathLike) -> dict[str, list[Path]]:
    """Images under `tree` grouped by the name of their parent folder (train/test sub-trees are pooled)."""
    tree = Path(tree)
    groups: dict[str, list[Path]] = {}
    for path in sorted(tree.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
            groups.setdefault(path.parent.name, []).append(path)
    if not groups:
        raise UserError(f"{tree}: no images found (expected a class-per-folder tree, e.g. train/cat/0001.jpg)")
    return groups


def split_tree(tree: str | os.PathLike, out_dir: str | os.PathLike, protocol: Protocol) -> dict:
    """Write train.txt, query.txt, database.txt and protocol.json into `out_dir` (paths relative to it)."""
    out_dir = Path(out_dir)
    groups = find_class_images(tree)
    classes = sorted(groups)
    if protocol.database not in ("all-but-query", "rest"):
        raise UserError(f"unknown database rule {protocol.database!r}; use 'all-but-query' or 'rest'")
    rng = np.random.default_rng(protocol.seed)
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    need = protocol.query_per_class + protocol.train_per_class
    for c, name in enumerate(classes):
        files = groups[name]
        if len(files) < need:
            raise UserError(f"class {name!r} in {tree} has {len(files)} images; protocol {protocol.name!r} needs "
                            f"{need} ({protocol.query_per_class} queries + {protocol.train_per_class} training)")
        order = rng.permutation(len(files))
        rel = [os.path.relpath(files[i], out_dir) for i in order]
        query, train, rest = (rel[:protocol.query_per_class], rel[protocol.query_per_class:need], rel[need:])
        rows["query"] += [(p, c) for p in query]
        rows["train"] += [(p, c) for p in train]
        database = train + rest if protocol.database == "all-but-query" else rest
        rows["database"] += [(p, c) for p in sorted(database)]
    counts = {}
    for split in SPLITS:
        labels = np.zeros((len(rows[split]), len(classes)), dtype=np.uint8)
        labels[np.arange(len(rows[split])), [c for _, c in rows[split]]] = 1
        write_list(out_dir / f"{split}.txt", [p for p, _ in rows[split]], labels)
        counts[split] = len(rows[split])
    record = {**asdict(protocol), "classes": classes, "counts": counts, "source": str(tree)}
    write_json(record, out_dir / "protocol.json")
    return record


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a .tar.gz into `dest/images` (atomically: a temporary folder renamed into place)."""
    archive, dest = Path(archive), Path(dest)
    target = dest / "images"
    if target.is_dir():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".images.", dir=dest))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot extract {archive}: {err}") from None
    return target


def build_lists(source: str | os.PathLike, out_dir: str | os.PathLike, protocol: Protocol) -> dict:
    """Lists for a class-per-folder tree or a .tar.gz of one; an archive is extracted into `out_dir/images`."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"data source not found: {source}")
    if source.is_file():
        if not (source.name.endswith((".tar.gz", ".tgz", ".tar"))):
            raise UserError(f"{source}: expected a folder or a .tar.gz of a class-per-folder image tree")
        source = extract_tar(source, out_dir)
    return split_tree(source, out_dir, protocol)


def resolve_class(value: str | int, classes: list[str] | None, n_classes: int) -> int:
    """A class given by index ("3") or by name ("cat", looked up in protocol.json's class list)."""
    text = str(value)
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < n_classes:
            raise UserError(f"class {index} does not exist; the data set has classes 0 to {n_classes - 1}")
        return index
    if classes and text in classes:
        return classes.index(text)
    known = ", ".join(classes) if classes else f"indices 0 to {n_classes - 1}"
    raise UserError(f"unknown class {text!r}; known classes: {known}")


def choose_class(value: str | int | None, classes: list[str] | None, n_classes: int, seed: int) -> int:
    """The class given (index or name), or one drawn with the seed when none is given."""
    if value is None:
        return int(np.random.default_rng(seed).integers(n_classes))
    return resolve_class(value, classes, n_classes)
