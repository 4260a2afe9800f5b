"""List files: one image per line, `relative/path.png 0 1 0 ...` (multi-hot labels; several 1s allowed)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.images import READ_ERRORS, read_error
from runs.errors import UserError
from runs.io import atomic_write_text


@dataclass
class ImageList:
    """A parsed list file: resolved image paths, multi-hot labels (N x C, uint8), and where each entry came from."""

    list_file: str
    paths: list[str]
    labels: np.ndarray
    line_numbers: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_classes(self) -> int:
        return int(self.labels.shape[1])

    def where(self, index: int) -> str:
        """`list_file:line` of entry `index`, for error messages."""
        return f"{self.list_file}:{self.line_numbers[index]}"


def resolve_path(path: str, root: str | os.PathLike, prefix_from: str | None = None, prefix_to: str = "") -> str:
    """Rewrite a leading `prefix_from` to `prefix_to`, then join relative paths to the data root."""
    if prefix_from and path.startswith(prefix_from):
        path = prefix_to + path[len(prefix_from):]
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


def read_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None, n_classes: int | None = None,
              prefix_from: str | None = None, prefix_to: str = "", check_files: bool = True) -> ImageList:
    """Parse and validate a list file. `root` defaults to the list file's folder.

    Every problem is reported with the file and line: a malformed line, a label that is not 0/1, a label vector of
    another width than the first line (or `n_classes`), an empty list, an image listed twice, and (with
    `check_files`) missing images.
    """
    list_file = str(list_file)
    if not os.path.isfile(list_file):
        raise UserError(f"list file not found: {list_file} (run prepare_data.py first, or check --data)")
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else str(root)
    paths: list[str] = []
    rows: list[list[int]] = []
    line_numbers: list[int] = []
    width_source = "--n-classes" if n_classes is not None else None
    try:
        with open(list_file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read list file {list_file}: {err}") from None
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{list_file}:{number}"
        if len(tokens) < 2:
            raise UserError(f"{where}: expected 'path label label ...', got {line.strip()!r}")
        try:
            row = [int(t) for t in tokens[1:]]
        except ValueError:
            raise UserError(f"{where}: labels must be 0 or 1, got {' '.join(tokens[1:])!r}") from None
        if any(v not in (0, 1) for v in row):
            raise UserError(f"{where}: labels must be 0 or 1, got {' '.join(tokens[1:])!r}")
        if n_classes is None:
            n_classes, width_source = len(row), f"line {number}"
        if len(row) != n_classes:
            raise UserError(f"{where}: label vector has {len(row)} values, expected {n_classes} "
                            f"(from {width_source}); every line needs one 0/1 value per class")
        paths.append(resolve_path(tokens[0], root, prefix_from, prefix_to))
        rows.append(row)
        line_numbers.append(number)
    if not paths:
        raise UserError(f"{list_file}: the list is empty; it needs one 'path 0 1 ...' line per image")
    seen: dict[str, int] = {}
    for path, number in zip(paths, line_numbers):
        if path in seen:
            raise UserError(f"{list_file}:{number}: {path} is already listed on line {seen[path]}; every image may "
                            f"appear once in a list (remove one of the two lines)")
        seen[path] = number
    image_list = ImageList(list_file, paths, np.asarray(rows, dtype=np.uint8), line_numbers)
    if check_files:
        missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
        if missing:
            i = missing[0]
            raise UserError(f"{image_list.where(i)}: image not found: {paths[i]} ({len(missing)} of {len(paths)} "
                            f"images missing; data root {root}; fix the paths with --data-root or "
                            f"--prefix-from/--prefix-to)")
        check_image_headers(image_list)
    return image_list


_HEADERS_CHECKED: set[tuple[str, int, int]] = set()  # (list file, mtime, size) whose images all opened


def check_image_headers(image_list: ImageList) -> None:
    """Every image of the list opens as an image (its header is parsed, not the pixels), so a damaged file stops a
    step before it writes anything; each list file is checked once per process (CIFAR-10's 59,000 database images:
    9 s on the 2-core development VM under load). A file damaged after its header is reported, naming list file
    and line, when it is decoded."""
    stat = os.stat(image_list.list_file)
    key = (os.path.realpath(image_list.list_file), stat.st_mtime_ns, stat.st_size)
    if key in _HEADERS_CHECKED:
        return
    for i, path in enumerate(image_list.paths):
        try:
            Image.open(path).close()  # opening parses the header; the pixels are read only on load
        except READ_ERRORS as err:
            raise read_error(image_list.where(i), path, err) from None
    _HEADERS_CHECKED.add(key)


def write_list(path: str | os.PathLike, rel_paths: list[str], labels: np.ndarray) -> None:
    """Write a list file atomically; `labels` is N x C multi-hot."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(rel_paths):
        raise ValueError(f"labels of shape {labels.shape} do not match {len(rel_paths)} paths")
    text = "".join(f"{p} {' '.join(str(int(v)) for v in row)}\n" for p, row in zip(rel_paths, labels))
    atomic_write_text(text, Path(path))
