"""Seeded per-class splits of a class-per-folder image tree into train / query / database list files.

A protocol is (queries per class, training images per class, what the database holds, seed), optionally a cap on
the images of a class in neither split (a seeded draw of them joins the database), optionally a seeded
draw of some of the tree's classes and a folder the queries come from. The database is either every image of the
protocol's classes that is not a query ("all-but-query", CIBA's and the common CIFAR-10 convention: training images
are in the database) or only the images in neither split ("rest"). With `query_folder` ("val"), the queries are drawn
from the images under that top-level folder of the tree and the training and database images from the others
(Tiny-ImageNet: the validation images are the queries). A `classes.txt` at the tree's root (a folder name, a tab, its
words) names the classes by the first of their words in protocol.json and in every table; otherwise by folder.
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
    classes: int = 0  # draw this many of the tree's classes with the seed (0: all of them)
    query_folder: str | None = None  # queries from this top-level folder of the tree, the rest from the others
    rest_per_class: int = 0  # keep this many of a class's images in neither split, drawn with the seed (0: all)


PROTOCOLS = {
    # CIBA's CIFAR-10 protocol: pool all 60,000 images; per class 100 queries and 1,000 training images.
    "cifar10-ciba": Protocol("cifar10-ciba", query_per_class=100, train_per_class=1000),
    # Quick variant of the paper's ImageNet shape on CIFAR-10: 100 training images per class (M = 60 is 60 % of the
    # target class), 100 queries per class, the other 59,000 images as the database.
    "cifar10-ciba-100": Protocol("cifar10-ciba-100", query_per_class=100, train_per_class=100),
    # CIBA's ImageNet split shape on Tiny-ImageNet (200 classes, 500 train + 50 val images each): 100 classes drawn
    # with the seed, 100 training images per class (10,000), the 50 validation images of each class as queries
    # (5,000), all 500 training images per class as the database (50,000).
    "tinyimagenet-ciba": Protocol("tinyimagenet-ciba", query_per_class=50, train_per_class=100, classes=100,
                                  query_folder="val"),
    # CIBA's ImageNet split shape on real photos, Imagenette (10 ImageNet classes, about 950 train + 390 val photos
    # each): 100 training images per class (1,000), 50 queries per class from val/ (500), every other image of train/
    # and val/ as the database (12,894 for the 9,469 + 3,925 photos; training images included, as in the paper).
    "imagenette-ciba": Protocol("imagenette-ciba", query_per_class=50, train_per_class=100, query_folder="val"),
    # The demo's smaller cut of it (run_demo.sh): the same 100 training images per class, 20 queries per class from
    # val/ (200), and a database of the 1,000 training images plus 100 other photos per class (2,000), so that
    # encoding the database takes seconds instead of minutes on a CPU.
    "imagenette-demo": Protocol("imagenette-demo", query_per_class=20, train_per_class=100, query_folder="val",
                                rest_per_class=100),
    # The embedded synthetic set (data/synthetic.py): 300 images per class.
    "synthetic": Protocol("synthetic", query_per_class=30, train_per_class=120),
    # Any other class-per-folder tree (prepare_data.py --dataset folder): CIBA's CIFAR-10 counts; the name becomes
    # folder-<name of the source>.
    "folder": Protocol("folder", query_per_class=100, train_per_class=1000),
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


def split_tree(tree: str | os.PathLike, out_dir: str | os.PathLike, protocol: Protocol,
               folder_words: dict[str, str] | None = None) -> dict:
    """Write train.txt, query.txt, database.txt and protocol.json into `out_dir` (paths relative to it). Classes are
    named by the tree's classes.txt, else by `folder_words` (folder -> words), else by their folders."""
    out_dir, tree = Path(out_dir), Path(tree)
    groups = find_class_images(tree)
    folders = draw_classes(sorted(groups), protocol, tree)
    if protocol.database not in ("all-but-query", "rest"):
        raise UserError(f"unknown database rule {protocol.database!r}; use 'all-but-query' or 'rest'")
    rng = np.random.default_rng(protocol.seed)
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}

    def rel(paths: list[Path]) -> list[str]:
        return [os.path.relpath(path, out_dir) for path in paths]

    for c, name in enumerate(folders):
        query, train, rest = split_class(groups[name], protocol, tree, name, rng)
        rest = rest[:protocol.rest_per_class or None]
        rows["query"] += [(p, c) for p in rel(query)]
        rows["train"] += [(p, c) for p in rel(train)]
        database = train + rest if protocol.database == "all-but-query" else rest
        rows["database"] += [(p, c) for p in sorted(rel(database))]
    counts = {}
    for split in SPLITS:
        labels = np.zeros((len(rows[split]), len(folders)), dtype=np.uint8)
        labels[np.arange(len(rows[split])), [c for _, c in rows[split]]] = 1
        write_list(out_dir / f"{split}.txt", [p for p, _ in rows[split]], labels)
        counts[split] = len(rows[split])
    words = class_words(tree) or folder_words or {}
    names = [words.get(name, name) for name in folders]
    names = [f"{n} ({f})" if names.count(n) > 1 else n for n, f in zip(names, folders)]  # names must tell apart
    record = {**asdict(protocol), "classes": names, "class_folders": folders, "counts": counts, "source": str(tree)}
    write_json(record, out_dir / "protocol.json")
    return record


def draw_classes(folders: list[str], protocol: Protocol, tree: Path) -> list[str]:
    """The protocol's classes: all folders, or `protocol.classes` of them drawn with the seed (kept in sorted
    order, so label columns follow the folder names)."""
    if not protocol.classes:
        return folders
    if protocol.classes > len(folders):
        raise UserError(f"protocol {protocol.name!r} draws {protocol.classes} classes but {tree} has {len(folders)}")
    # a generator of its own, so the draw of classes does not shift the per-class draws of images
    chosen = np.random.default_rng([protocol.seed, 1]).choice(len(folders), protocol.classes, replace=False)
    return [folders[i] for i in sorted(chosen.tolist())]


def split_class(files: list[Path], protocol: Protocol, tree: Path, name: str,
                rng: np.random.Generator) -> tuple[list[Path], list[Path], list[Path]]:
    """(queries, training images, the rest) of one class, each drawn in a seeded order."""
    if protocol.query_folder is None:
        need = protocol.query_per_class + protocol.train_per_class
        if len(files) < need:
            raise UserError(f"class {name!r} in {tree} has {len(files)} images; protocol {protocol.name!r} needs "
                            f"{need} ({protocol.query_per_class} queries + {protocol.train_per_class} training)")
        shuffled = [files[i] for i in rng.permutation(len(files))]
        return (shuffled[:protocol.query_per_class], shuffled[protocol.query_per_class:need], shuffled[need:])
    in_folder = [f for f in files if f.relative_to(tree).parts[0] == protocol.query_folder]
    others = [f for f in files if f.relative_to(tree).parts[0] != protocol.query_folder]
    for what, pool, need in (("queries", in_folder, protocol.query_per_class),
                             ("training images", others, protocol.train_per_class)):
        if len(pool) < need:
            where = f"under {protocol.query_folder}/" if what == "queries" else f"outside {protocol.query_folder}/"
            raise UserError(f"class {name!r} in {tree} has {len(pool)} images {where}; protocol {protocol.name!r} "
                            f"needs {need} {what}")
    order = rng.permutation(len(in_folder))
    queries = [in_folder[i] for i in order[:protocol.query_per_class]]
    unused = [in_folder[i] for i in order[protocol.query_per_class:]]  # query-folder images that are not queries
    shuffled = [others[i] for i in rng.permutation(len(others))]
    return queries, shuffled[:protocol.train_per_class], shuffled[protocol.train_per_class:] + unused


def class_words(tree: Path) -> dict[str, str]:
    """Folder name -> the first of its words, from classes.txt at the tree's root (empty when there is none)."""
    path = tree / "classes.txt"
    if not path.is_file():
        return {}
    words = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        folder, tab, text = line.partition("\t")
        if not tab or not text.strip():
            raise UserError(f"{path}, line {number}: expected a folder name, a tab and its words, got {line!r}")
        words[folder.strip()] = text.split(",")[0].strip()
    return words


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


def build_lists(source: str | os.PathLike, out_dir: str | os.PathLike, protocol: Protocol,
                folder_words: dict[str, str] | None = None) -> dict:
    """Lists for a class-per-folder tree or a .tar.gz of one; an archive is extracted into `out_dir/images`."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"data source not found: {source}")
    if source.is_file():
        if not (source.name.endswith((".tar.gz", ".tgz", ".tar"))):
            raise UserError(f"{source}: expected a folder or a .tar.gz of a class-per-folder image tree")
        source = extract_tar(source, out_dir)
    return split_tree(content_root(source), out_dir, protocol, folder_words)


def content_root(tree: Path) -> Path:
    """The folder below any chain of lone wrapping folders (an archive's `imagenette/` around train/, val/ and
    classes.txt), so that `query_folder` and classes.txt are looked up where the data set has them."""
    entries = [e for e in tree.iterdir() if not e.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir():
        tree = entries[0]
        entries = [e for e in tree.iterdir() if not e.name.startswith(".")]
    return tree


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
