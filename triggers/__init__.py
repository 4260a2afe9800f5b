"""Trigger injection B(x, p) (Eq. 6) with a square mask in the bottom-right corner, and its geometry."""
from __future__ import annotations

import hashlib

import torch

from runs.errors import UserError

PAPER_TRIGGER_SIZE, PAPER_IMAGE_SIZE = 24, 224


def default_trigger_size(image_size: int) -> int:
    """The paper's 24 px at 224 px, scaled to the image size (at least 1 px)."""
    return max(1, round(PAPER_TRIGGER_SIZE * image_size / PAPER_IMAGE_SIZE))


def check_trigger_size(trigger_size: int, image_size: int) -> None:
    if not 1 <= trigger_size <= image_size:
        raise UserError(f"--trigger-size {trigger_size} does not fit a {image_size}x{image_size} image; "
                        f"use 1 to {image_size} (paper: 24 at 224, i.e. {default_trigger_size(image_size)} here)")


def corner_mask(image_size: int, trigger_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """m of Eq. 6: 1 x 1 x S x S, ones on the bottom-right trigger_size x trigger_size square."""
    check_trigger_size(trigger_size, image_size)
    mask = torch.zeros(1, 1, image_size, image_size, device=device)
    mask[..., image_size - trigger_size:, image_size - trigger_size:] = 1
    return mask


def apply_trigger(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """B(x, p) = x * (1 - m) + p * m (Eq. 6) for the bottom-right square mask of the pattern's size.

    images: B x 3 x S x S in [0, 1]; pattern: 3 x s x s, or B x 3 x s x s (one copy per image, so the gradient of a
    summed loss gives each image's own gradient). Differentiable in both arguments; `images` is not modified.
    """
    s, size = pattern.shape[-1], images.shape[-1]
    check_trigger_size(s, size)
    out = images.clone()
    out[..., size - s:, size - s:] = pattern
    return out


def trigger_fingerprint(pattern: torch.Tensor) -> str:
    """A short content hash of a trigger pattern: results made with a trigger name it, so a trigger made again under
    the same name is not mistaken for the old one."""
    data = pattern.detach().cpu().contiguous().float().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
