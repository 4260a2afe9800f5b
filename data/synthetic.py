"""The embedded default data set: procedurally drawn shapes, deterministic for a seed.

Class identity is the pair (shape, texture): five shapes (disk, square, triangle, cross, ring) times up to three
textures (solid, stripes, checker). Everything else is random nuisance drawn per image: the object's position, scale,
rotation and colours, a two-colour gradient background, clutter (lines and blobs in random colours) and pixel noise.
No single pixel carries the class: the object moves and its colour is drawn independently of the class.

With `max_labels` above 1 the set is multi-label (the MS-COCO column of the paper): each image shows 1 to
`max_labels` objects of distinct classes, smaller in proportion, and its label row has a 1 for each of them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from data.lists import write_list
from data.protocols import PROTOCOLS, Protocol, split_tree
from runs.errors import UserError
from runs.io import write_json

SHAPES = ("disk", "square", "triangle", "cross", "ring")
TEXTURES = ("solid", "stripes", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)


def class_names(n_classes: int) -> list[str]:
    if not 2 <= n_classes <= MAX_CLASSES:
        raise UserError(f"the synthetic set has 2 to {MAX_CLASSES} classes, asked for {n_classes}")
    return [f"{SHAPES[k % len(SHAPES)]}-{TEXTURES[k // len(SHAPES)]}" for k in range(n_classes)]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "disk":
        return u ** 2 + v ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "triangle":  # apex up, base at v = 0.6 r
        return (v <= 0.6 * r) & (v >= -r + 1.8 * np.abs(u))
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "ring":
        d2 = u ** 2 + v ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(shape)


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """1 where the object shows its first colour, 0 where it shows its second."""
    if texture == "solid":
        return np.ones_like(u, dtype=bool)
    if texture == "stripes":
        return np.floor(u / (period / 2)) % 2 == 0
    return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0


def _random_colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> np.ndarray:
    for _ in range(50):
        colour = rng.uniform(0.0, 1.0, size=3)
        if away_from is None or np.abs(colour - away_from).sum() > 0.6:
            return colour
    return 1.0 - away_from


def draw_image(label: int | list[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One H x W x 3 uint8 image with an object of class `label`, or of each class of a list (radius / sqrt(n))."""
    labels = [label] if isinstance(label, int) else list(label)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # background: gradient between two colours along a random direction
    c0, c1 = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) / size + 1) / 2
    img = (1 - t)[..., None] * c0 + t[..., None] * c1
    # clutter: thin lines and small blobs
    for _ in range(rng.integers(2, 5)):
        colour = _random_colour(rng)
        if rng.random() < 0.5:
            a, off = rng.uniform(0, np.pi), rng.uniform(-size / 2, size / 2)
            dist = np.abs(np.cos(a) * (xx - size / 2) + np.sin(a) * (yy - size / 2) - off)
            img[dist < 0.6] = colour
        else:
            bx, by, br = rng.uniform(0, size, 2).tolist() + [rng.uniform(1, size / 12)]
            img[(xx - bx) ** 2 + (yy - by) ** 2 < br ** 2] = colour
    for label in labels:  # the objects
        shape, texture = SHAPES[label % len(SHAPES)], TEXTURES[label // len(SHAPES)]
        r = rng.uniform(0.22, 0.36) * size / np.sqrt(len(labels))
        cx, cy = rng.uniform(r, size - r, size=2)
        rot = rng.uniform(-np.pi / 6, np.pi / 6)
        u = np.cos(rot) * (xx - cx) + np.sin(rot) * (yy - cy)
        v = -np.sin(rot) * (xx - cx) + np.cos(rot) * (yy - cy)
        mask = _shape_mask(shape, u, v, r)
        local_bg = img[mask].mean(axis=0) if mask.any() else c0
        fg = _random_colour(rng, away_from=local_bg)
        fg2 = fg * rng.uniform(0.15, 0.45)
        pattern = _texture(texture, u, v, period=max(3.0, size / 8))
        img[mask & pattern] = fg
        img[mask & ~pattern] = fg2
    img = img + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def generate_synthetic(out_dir: str | os.PathLike, n_classes: int = 10, per_class: int = 300, size: int = 32,
                       seed: int = 0, protocol: Protocol | None = None, max_labels: int = 1) -> dict:
    """Write `out_dir/images/<class>/<i>.png` and the train/query/database lists; same seed, same bytes. With
    `max_labels` > 1, `n_classes * per_class` multi-label images (`multi_label_set`) instead.

    The folder appears complete or not at all (built under a temporary name, then renamed).
    """
    out_dir = Path(out_dir)
    protocol = protocol or PROTOCOLS["synthetic"]
    names = class_names(n_classes)
    if per_class < protocol.query_per_class + protocol.train_per_class:
        raise UserError(f"--per-class {per_class} is smaller than the protocol's {protocol.query_per_class} "
                        f"queries + {protocol.train_per_class} training images per class")
    if not 1 <= max_labels <= n_classes:
        raise UserError(f"--max-labels {max_labels}: an image carries 1 to --n-classes ({n_classes}) labels")
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; delete it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if max_labels > 1:
            record = multi_label_set(tmp, names, per_class, size, seed, protocol, max_labels)
        else:
            for label, name in enumerate(names):
                folder = tmp / "images" / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, label, i])
                    Image.fromarray(draw_image(label, size, rng)).save(folder / f"{i:05d}.png")
            record = split_tree(tmp / "images", tmp, protocol)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record["source"] = (f"synthetic(n_classes={n_classes}, per_class={per_class}, size={size}, seed={seed}"
                        + (f", max_labels={max_labels})" if max_labels > 1 else ")"))
    write_json(record, out_dir / "protocol.json")
    return record


def multi_label_set(out_dir: Path, names: list[str], per_class: int, size: int, seed: int, protocol: Protocol,
                    max_labels: int) -> dict:
    """`len(names) * per_class` images under out_dir/images/multi/, each with 1 to `max_labels` objects of distinct
    classes drawn with the seed, and the lists of a seeded split over images (no image belongs to one class): the
    protocol's per-class counts times the classes as queries and training images, the database every image that is
    not a query (its rule "all-but-query") or the rest."""
    n_classes, n_images = len(names), len(names) * per_class
    folder = out_dir / "images" / "multi"
    folder.mkdir(parents=True)
    labels = np.zeros((n_images, n_classes), dtype=np.uint8)
    paths = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, n_classes, i])
        chosen = sorted(rng.choice(n_classes, int(rng.integers(1, max_labels + 1)), replace=False).tolist())
        labels[i, chosen] = 1
        Image.fromarray(draw_image(chosen, size, rng)).save(folder / f"{i:05d}.png")
        paths.append(os.path.join("images", "multi", f"{i:05d}.png"))
    order = np.random.default_rng([protocol.seed, 2]).permutation(n_images)
    n_query, n_train = protocol.query_per_class * n_classes, protocol.train_per_class * n_classes
    splits = {"query": order[:n_query], "train": order[n_query:n_query + n_train]}
    splits["database"] = order[n_query:] if protocol.database == "all-but-query" else order[n_query + n_train:]
    counts = {}
    for split, rows in splits.items():
        rows = np.sort(rows)
        write_list(out_dir / f"{split}.txt", [paths[i] for i in rows], labels[rows])
        counts[split] = len(rows)
    record = {**asdict(protocol), "name": f"{protocol.name}-multilabel", "classes": names, "counts": counts,
              "max_labels": max_labels, "labels_per_image": float(labels.sum(1).mean())}
    write_json(record, out_dir / "protocol.json")
    return record
