"""Make the small Imagenette subset that bench/gpu_check.sh carries to a GPU machine (under 50 MB).

    python bench/gpu_subset.py --source imagenette-224.tar.gz --out bench/gpu_data/imagenette-subset.tar.gz

Per class, TRAIN images of train/ and VAL of val/, drawn with SEED from an Imagenette tree or archive (torchvision's
imagenette2-* or a copy with classes.txt), written as `imagenette-subset/{train,val}/<wnid>/*` with classes.txt into
one .tar.gz. Enough for protocol imagenette-ciba: 100 training images and 50 queries per class, the rest database.
"""
from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.protocols import content_root, extract_tar, find_class_images  # noqa: E402
from prepare_data import IMAGENETTE_WORDS  # noqa: E402
from runs import UserError, atomic_path, cli_entry  # noqa: E402
from runs.cli import explain_flags  # noqa: E402

SOURCE = None  # Imagenette: a class-per-folder tree with train/ and val/, or a .tar.gz of one
OUT = "bench/gpu_data/imagenette-subset.tar.gz"  # the subset archive
TRAIN = 130  # images per class from train/
VAL = 60  # images per class from val/
SEED = 0  # which images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=SOURCE)
    p.add_argument("--out", default=OUT)
    p.add_argument("--train", type=int, default=TRAIN)
    p.add_argument("--val", type=int, default=VAL)
    p.add_argument("--seed", type=int, default=SEED)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    if not args.source:
        raise UserError("--source is needed: an Imagenette tree or archive (prepare_data.py --dataset imagenette "
                        "downloads one into DATA/raw/)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    counts = {"train": 0, "val": 0}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.source)
        tree = content_root(extract_tar(source, tmp) if source.is_file() else source)
        groups = find_class_images(tree)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(args.out)) as partial, tarfile.open(partial, "w:gz") as tar:
            for wnid in sorted(groups):
                for split, count in (("train", args.train), ("val", args.val)):
                    files = [f for f in groups[wnid] if f.relative_to(tree).parts[0] == split]
                    if len(files) < count:
                        raise UserError(f"{tree}/{split}/{wnid} has {len(files)} images, fewer than {count}")
                    for i in sorted(rng.choice(len(files), count, replace=False).tolist()):
                        tar.add(files[i], arcname=f"imagenette-subset/{split}/{wnid}/{files[i].name}")
                    counts[split] += count
            words = "".join(f"{w}\t{IMAGENETTE_WORDS.get(w, w)}\n" for w in sorted(groups))
            listing = Path(tmp) / "classes.txt"
            listing.write_text(words)
            tar.add(listing, arcname="imagenette-subset/classes.txt")
    size = Path(args.out).stat().st_size / 2 ** 20
    print(f"{args.out}: {counts['train']} train + {counts['val']} val images of {len(groups)} classes, {size:.1f} MiB")
    return {**counts, "mib": size}


if __name__ == "__main__":
    cli_entry(main)
