"""Dataset over a list file: (image 3 x S x S in [0,1], multi-hot label, index)."""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.images import READ_ERRORS, image_transform, open_rgb, read_error
from data.lists import ImageList, read_list


class HashListDataset(Dataset):
    """Images of an ImageList through `transform` (see data.images.image_transform).

    The images at `plain_indices` go through `plain_transform` instead (step 5: the poisoned images are not
    augmented, as in the CIBA paper's code, while the clean ones are).
    """

    def __init__(self, image_list: ImageList, transform: Callable[[Image.Image], torch.Tensor],
                 plain_indices: Iterable[int] = (),
                 plain_transform: Callable[[Image.Image], torch.Tensor] | None = None):
        self.image_list = image_list
        self.transform = transform
        self.labels = torch.from_numpy(image_list.labels.astype("float32"))
        self.plain_indices = frozenset(int(i) for i in plain_indices)
        if self.plain_indices and plain_transform is None:
            raise ValueError("plain_indices need a plain_transform")
        self.plain_transform = plain_transform

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path = self.image_list.paths[index]
        try:
            img = open_rgb(path)
        except READ_ERRORS as err:
            raise read_error(self.image_list.where(index), path, err) from None
        transform = self.plain_transform if index in self.plain_indices else self.transform
        return transform(img), self.labels[index], index


def open_split(data_dir: str, split: str, size: int, resize_size: int, augment: str = "none",
               data_root: str | None = None, prefix_from: str | None = None, prefix_to: str = "",
               n_classes: int | None = None) -> HashListDataset:
    """The `split` list (train, query or database) of a data folder as a dataset of S x S images."""
    image_list = read_list(os.path.join(data_dir, f"{split}.txt"), root=data_root or data_dir, n_classes=n_classes,
                           prefix_from=prefix_from, prefix_to=prefix_to)
    return HashListDataset(image_list, image_transform(size, resize_size, augment))


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                batch_sampler: Iterable[list[int]] | None = None) -> DataLoader:
    """A DataLoader with the project's settings (pinned memory on CUDA, persistent workers off for one-shot use);
    `batch_sampler` (lists of indices) replaces batch_size, shuffle and drop_last."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                          pin_memory=torch.cuda.is_available())
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last)


def open_run_split(config: dict, split: str, augment: str = "none") -> HashListDataset:
    """A split of the data a run was trained on, with that run's image size, data root and path rewrite."""
    return open_split(config["data"], split, config["image_size"], config["resize_size"], augment,
                      data_root=config.get("data_root"), prefix_from=config.get("prefix_from"),
                      prefix_to=config.get("prefix_to", ""), n_classes=config["n_classes"])
