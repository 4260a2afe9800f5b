"""A training set decoded once and kept as uint8 tensors (in memory or on the GPU), its batches augmented there.

Steps 1 and 5 read every training image once per epoch; with this cache the files are decoded and brought to their
source size once (data.images.source_transform), and each epoch's batches are gathered from the tensor and augmented
batched on the training device (data.augment), with no worker processes and no per-image Python work.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from data.augment import augment_batch
from data.dataset import HashListDataset
from data.images import source_transform
from runs.errors import UserError

CACHE_MODES = ("off", "memory", "device")
CACHE_FRACTION = 0.5  # the cache may take at most this share of the free memory (host or GPU)


def cache_bytes(n_images: int, size: int, resize_size: int, augment: str) -> int:
    """uint8 bytes of the decoded sources of n images."""
    side = resize_size if augment == "resized-crop" else size
    return n_images * 3 * side * side


def free_bytes(where: torch.device) -> int:
    """Free memory of a CUDA device, or available host memory: MemAvailable of /proc/meminfo (free pages plus the
    page cache the kernel can give back), else the free pages from sysconf, else 0."""
    if where.type == "cuda":
        return torch.cuda.mem_get_info(where)[0]
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def fits(n_bytes: int, where: torch.device) -> bool:
    return n_bytes <= CACHE_FRACTION * free_bytes(where)


def resolve_cache(mode: str, n_bytes: int, device: torch.device, cpu_auto: str = "memory") -> str:
    """--cache auto|off|memory|device -> off|memory|device for n_bytes of decoded images used on `device`.

    auto: on CUDA the GPU when they fit (at most CACHE_FRACTION of its free memory), else host memory likewise, else
    off; on the CPU `cpu_auto` when it fits, else off. A cache asked for by name that does not fit is an error."""
    host = torch.device("cpu")
    if mode == "auto":
        candidates = ("device", "memory") if device.type == "cuda" else (cpu_auto,)
        return next((c for c in candidates if c == "off" or fits(n_bytes, device if c == "device" else host)), "off")
    if mode != "off":
        where = device if mode == "device" else host
        if not fits(n_bytes, where):
            raise UserError(f"--cache {mode}: the decoded images need {n_bytes / 2 ** 30:.1f} GiB, more than half of "
                            f"the {free_bytes(where) / 2 ** 30:.1f} GiB free on {where}; use --cache memory, --cache "
                            f"off or fewer images")
    return mode


class DecodedImages:
    """The images of a HashListDataset as uint8 sources on `store` (the CPU or a GPU), labels beside them.

    Entries in the dataset's plain_indices (step 5's poisoned images, not augmented by default) are also kept as
    their canonical S x S image, which replaces the augmented one in every batch.
    """

    def __init__(self, dataset: HashListDataset, size: int, resize_size: int, augment: str, store: torch.device,
                 workers: int = 0):
        self.size, self.augment, self.store = size, augment, store
        self.images = decode(uint8_sources(dataset.image_list, size, resize_size, augment), workers).to(store)
        self.labels = dataset.labels.to(store)
        plain = sorted(dataset.plain_indices)
        self.plain_slot = torch.full((len(dataset),), -1, dtype=torch.long)
        self.plain_slot[plain] = torch.arange(len(plain))
        canonical = uint8_sources(dataset.image_list, size, resize_size)
        self.plain = decode(Subset(canonical, plain), workers).to(store) if plain else None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: torch.Tensor, batch_size: int, drop_last: bool, generator: torch.Generator,
                device: torch.device, share: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float B x 3 x S x S in [0, 1], labels) on `device`, in `order` (CPU indices), augmented with
        `generator`. No host synchronisation: which entries are plain is known on the CPU.

        share = (rank, world): this process's contiguous part of every batch (batch_size / world images). Every
        process augments the whole batch with the same generator, so the parts are what one process would make."""
        rank, world = share
        part = batch_size // world
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            batch = order[start:start + batch_size]
            sources = self.images[batch.to(self.store, non_blocking=True)].to(device, non_blocking=True)
            mine = slice(rank * part, (rank + 1) * part)
            index, images = batch[mine], augment_batch(sources, self.augment, self.size, generator)[mine]
            at_store = index.to(self.store, non_blocking=True)
            slots = self.plain_slot[index]
            plain = torch.nonzero(slots >= 0).flatten()
            if len(plain):
                chosen = self.plain[slots[plain].to(self.store, non_blocking=True)]
                images[plain.to(device, non_blocking=True)] = chosen.to(device, non_blocking=True).float() / 255
            yield images, self.labels[at_store].to(device, non_blocking=True)


def uint8_sources(image_list, size: int, resize_size: int, augment: str = "none") -> HashListDataset:
    """The images of a list as uint8 tensors at their source size (data.images.source_transform; "none": the
    canonical S x S image), what a cache keeps: u / 255 is exactly what the float transforms give."""
    return HashListDataset(image_list, transforms.Compose([source_transform(size, resize_size, augment),
                                                           transforms.PILToTensor()]))


def decode(dataset, workers: int) -> torch.Tensor:
    """Stack a dataset of equal-sized uint8 images into one tensor (N x 3 x H x W), decoded by `workers`."""
    out, filled = None, 0
    for images, *_ in DataLoader(dataset, batch_size=256, num_workers=workers):
        if out is None:
            out = torch.empty((len(dataset), *images.shape[1:]), dtype=torch.uint8)
        out[filled:filled + len(images)] = images
        filled += len(images)
    return out if out is not None else torch.empty(0, dtype=torch.uint8)
