"""Canonical image loading (every image becomes S x S), the train/eval transforms, and PNG output."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import functional as TF

from data.augment import pad_crop_padding
from runs.errors import UserError
from runs.io import atomic_path

AUGMENTATIONS = ("resized-crop", "pad-crop", "none")
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def open_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB (raises the PIL/OS error on an unreadable file)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def canonical(img: Image.Image, size: int, resize_size: int) -> Image.Image:
    """Bring an image to size x size (Section 4.1 recipe: resize to R x R, centre crop S).

    An image that is already S x S is returned unchanged, so a poisoned PNG written at S x S reads back bit-exact.
    """
    if img.size == (size, size):
        return img
    img = TF.resize(img, [resize_size, resize_size], interpolation=transforms.InterpolationMode.BILINEAR)
    return TF.center_crop(img, [size, size])


def load_canonical(path: str, size: int, resize_size: int) -> torch.Tensor:
    """Read `path` as a float tensor 3 x S x S in [0, 1]."""
    return TF.to_tensor(canonical(open_rgb(path), size, resize_size))


class Canonical:
    """Transform form of `canonical` (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, size: int, resize_size: int):
        self.size, self.resize_size = size, resize_size

    def __call__(self, img: Image.Image) -> Image.Image:
        return canonical(img, self.size, self.resize_size)


def source_transform(size: int, resize_size: int, augment: str = "none") -> Callable[[Image.Image], Image.Image]:
    """The deterministic part of image_transform: what the random part starts from (R x R for resized-crop, the
    canonical S x S otherwise). Training caches keep its output and apply the random part batched (data.augment)."""
    if augment == "resized-crop":
        return transforms.Resize((resize_size, resize_size))
    if augment in ("pad-crop", "none"):
        return Canonical(size, resize_size)
    raise UserError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")


def image_transform(size: int, resize_size: int, augment: str = "none") -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor 3 x S x S in [0, 1]. Normalisation happens inside the model.

    augment: "resized-crop" (paper: resize to R x R, RandomResizedCrop S, horizontal flip), "pad-crop" (32x32 recipe:
    canonical image, random crop with S/8 zero padding, horizontal flip), "none" (evaluation: canonical only).
    """
    ops = [source_transform(size, resize_size, augment)]
    if augment == "resized-crop":
        ops += [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    elif augment == "pad-crop":
        ops += [transforms.RandomCrop(size, padding=pad_crop_padding(size)), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*ops, transforms.ToTensor()])


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """3 x H x W float in [0, 1] -> H x W x 3 uint8 (rounded, as PNG stores it)."""
    return (image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Write a PNG atomically (temporary name, then rename). Accepts 3xHxW float in [0,1] or HxWx3 uint8."""
    array = to_uint8_hwc(image) if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def read_error(where: str, path: str, err: Exception) -> UserError:
    return UserError(f"{where}: cannot read image {path} ({type(err).__name__}: {err}); "
                     f"replace the file or remove its line from the list")
