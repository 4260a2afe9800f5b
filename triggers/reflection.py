"""Reflection triggers (Refool: Liu et al., "Reflection Backdoor", ECCV 2020), batched.

A poisoned or triggered image x (the transmission layer) gets a reflection layer made from one image r of a fixed
set of reflection images, drawn at random for every image (from a seeded table the image's own pixels index into,
so an image's reflection does not depend on the batch it is in), with one of the paper's two reflection models:

ghost effect (probability GHOST_RATE)   r' = a r + (1 - a) shift(r, (dy, dx)), a = |s - U(0.15, 0.5)|, s in {0, 1}
                                        equally likely, dy and dx uniform in {3, ..., 8} px at 560 px;
focal blur                              r' = Gaussian blur of r with sigma uniform in [1, 5] px at 560 px;

then, in linear light (gamma 2.2), x_R = (alpha_t x^2.2 + (1 - alpha_t) r'^2.2)^(1 / 2.2) with the transmission
weight alpha_t = 1 - U(0.05, 0.45). The ranges are those of the Refool code; its images are resized to 560 px, so
offsets and sigmas are scaled by S / 560 (offsets at least 1 px). Left out, as stated in docs/steps.md: Refool's
choice of reflection images by attack success and SSIM, and the vignette and range adjustment of its focal-blur
layer (the focal-blur layer is blended like the ghost layer).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from data import open_run_split
from data.cache import decode, uint8_sources
from runs.errors import UserError

GHOST_RATE = 0.49  # Refool's default share of ghost-effect reflections
REFOOL_SIZE = 560  # the image side Refool's offsets and sigmas are given at
GAMMA = 2.2


DRAWS = 65536  # rows of the table of reflection draws an image's pixels index into


def reflection_draws(n_reflections: int, seed: int, ghost_rate: float = GHOST_RATE) -> dict[str, torch.Tensor]:
    """A seeded table of DRAWS reflection settings (which reflection image, ghost or focal blur, alpha_t, offsets,
    ghost weight, sigma at 560 px), and the integer weights that turn an image's 8-bit pixels into its row: the same
    image gets the same reflection however the images are batched or ordered."""
    generator = torch.Generator().manual_seed(seed)

    def uniform() -> torch.Tensor:  # one draw per row; the order of the calls below fixes the table
        return torch.rand(DRAWS, generator=generator)
    return {"pick": torch.randint(n_reflections, (DRAWS,), generator=generator),
            "alpha_t": 1 - (0.05 + 0.4 * uniform()),
            "ghost": uniform() < ghost_rate,
            "offsets": torch.randint(3, 9, (DRAWS, 2), generator=generator),
            "ghost_alpha": (torch.randint(0, 2, (DRAWS,), generator=generator).float() - (0.15 + 0.35 * uniform())).abs(),
            "sigma": 1 + 4 * uniform(),
            "weights": torch.randint(1, 2 ** 31 - 1, (3 * 1024 * 1024,), generator=generator)}


def reflect(images: torch.Tensor, reflections: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each image of a B x 3 x S x S batch in [0, 1] with the reflection its 8-bit pixels select from `draws`
    (reflection_draws), made from `reflections` (K x 3 x S x S, uint8 or float in [0, 1]). B x 3 x S x S in [0, 1]."""
    batch, _, size, _ = images.shape
    device = images.device
    pixels = (images.clamp(0, 1) * 255).round().long().flatten(1)
    if pixels.shape[1] > len(draws["weights"]):
        raise ValueError(f"images of {pixels.shape[1]} values are larger than the reflection draws allow")
    row = ((pixels * draws["weights"][:pixels.shape[1]].to(device)).sum(1) % DRAWS).cpu()

    def take(key: str) -> torch.Tensor:
        return draws[key][row].to(device)
    layer = reflections[take("pick").cpu()].to(device)
    layer = layer.float() / 255 if not layer.is_floating_point() else layer
    scale = size / REFOOL_SIZE
    offsets = (take("offsets").float() * scale).round().clamp(min=1).long()
    ghost_alpha = take("ghost_alpha").view(-1, 1, 1, 1)
    ghosted = ghost_alpha * layer + (1 - ghost_alpha) * shift(layer, offsets)
    blurred = gaussian_blur(layer, take("sigma") * scale)
    layer = torch.where(take("ghost").view(-1, 1, 1, 1), ghosted, blurred)
    alpha_t = take("alpha_t").view(-1, 1, 1, 1)
    linear = alpha_t * images.clamp(0, 1).pow(GAMMA) + (1 - alpha_t) * layer.clamp(0, 1).pow(GAMMA)
    return linear.clamp(0, 1).pow(1 / GAMMA)


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image moved down by offsets[i, 0] and right by offsets[i, 1] px (B x 2, >= 0), zeros shifted in; one
    gather for the whole batch."""
    batch, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, -1) - offsets[:, :1]  # B x H
    cols = torch.arange(width, device=images.device).view(1, -1) - offsets[:, 1:]  # B x W
    inside = (rows >= 0).view(batch, 1, height, 1) & (cols >= 0).view(batch, 1, 1, width)
    index = rows.clamp(min=0).view(batch, 1, height, 1) * width + cols.clamp(min=0).view(batch, 1, 1, width)
    flat = images.flatten(2).gather(2, index.expand(-1, channels, -1, -1).flatten(2))
    return flat.view(batch, channels, height, width) * inside


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own Gaussian of standard deviation sigma[i] px (a separable kernel of
    2 ceil(2 sigma_max) + 1 taps, normalised, reflect padding): one grouped convolution per axis for the batch."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(2 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).clamp(min=1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B*C) x taps
    flat = images.reshape(1, batch * channels, height, width)
    padded = F.pad(flat, (radius, radius, 0, 0), mode="reflect" if width > radius else "replicate")
    flat = F.conv2d(padded, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    padded = F.pad(flat, (0, 0, radius, radius), mode="reflect" if height > radius else "replicate")
    flat = F.conv2d(padded, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def reflection_images(clean: dict, target: int, count: int, seed: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """Refool's reflection set: `count` database images drawn with the seed among those outside the training list
    whose labels exclude the target, as count x 3 x S x S uint8, and their paths."""
    database = open_run_split(clean, "database").image_list
    training = set(open_run_split(clean, "train").image_list.paths)
    candidates = [i for i, path in enumerate(database.paths)
                  if path not in training and not database.labels[i, target]]
    if len(candidates) < count:
        raise UserError(f"{database.list_file} has {len(candidates)} images outside the training list and the "
                        f"target class; --reflections {count} needs at least that many")
    chosen = sorted(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())
    sources = uint8_sources(database, clean["image_size"], clean["resize_size"])
    return decode(torch.utils.data.Subset(sources, chosen), workers), [database.paths[i] for i in chosen]
