"""The training augmentations of data.images.image_transform, batched on tensors (for images cached on a device).

Same distributions as the PIL path, drawn with a torch.Generator on the CPU (so a seed gives the same crops on any
device) and applied to a whole batch at once:
pad-crop       zero padding of max(1, S / 8) px on every side, a uniformly placed S x S crop, horizontal flip with
               probability 1/2 (torchvision RandomCrop(padding) + RandomHorizontalFlip);
resized-crop   the R x R resized image, a crop of area fraction U(0.08, 1) and log-uniform aspect ratio in
               [3/4, 4/3] (up to 10 draws, else the whole image), resized to S x S, flip
               (RandomResizedCrop + RandomHorizontalFlip). The crop is resized bilinearly (crop_resize): equal to the
               plain path's resize when the crop is enlarged; when it is shrunk (crops wider than S) the plain path's
               PIL filter also averages neighbouring pixels (antialiasing), this one does not.
"""
from __future__ import annotations

import math

import torch

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIALS = 10


def pad_crop_padding(size: int) -> int:
    """The pad-crop recipe's padding: S / 8 px (4 px at 32 px), at least 1."""
    return max(1, size // 8)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_pad_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """B x C x S x S -> B x C x S x S: zero-pad by pad_crop_padding(S), crop S x S at a uniform offset per image."""
    b, _, size, _ = images.shape
    pad = pad_crop_padding(size)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(images.device, non_blocking=True)
    span = torch.arange(size, device=images.device)
    rows = (offsets[0, :, None] + span)[:, None, :, None]  # B x 1 x S x 1
    cols = (offsets[1, :, None] + span)[:, None, None, :]  # B x 1 x 1 x S
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def resized_crop_boxes(b: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """B x 4 crops (x1, y1, x2, y2) in pixels, drawn as torchvision's RandomResizedCrop.get_params draws them."""
    area = height * width
    scale = torch.empty(b, CROP_TRIALS).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(b, CROP_TRIALS).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]),
                                                      generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * scale * ratio))
    h = torch.round(torch.sqrt(area * scale / ratio))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.int8).argmax(1, keepdim=True)  # the first trial that fits
    found = valid.any(1)
    top, left, fallback_h, fallback_w = (torch.tensor(float(v)) for v in central_crop(height, width))
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    u = torch.rand(2, b, generator=generator)
    y = torch.where(found, torch.floor(u[0] * (height - h + 1)), top)
    x = torch.where(found, torch.floor(u[1] * (width - w + 1)), left)
    return torch.stack([x, y, x + w, y + h], 1)


def central_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback (top, left, h, w): the largest central crop with an allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (x1, y1, x2, y2 in pixels) cropped and resized to size x size, bilinear: the crop first,
    then the resize with half-pixel centres (torchvision's resized_crop without antialiasing), in one grid_sample."""
    _, _, height, width = images.shape
    steps = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size

    def axis(low: torch.Tensor, high: torch.Tensor, extent: int) -> torch.Tensor:
        pixel = low[:, None] + steps * (high - low)[:, None] - 0.5  # source pixel of each output pixel
        pixel = torch.maximum(torch.minimum(pixel, high[:, None] - 1), low[:, None])  # stay inside the crop
        return (pixel + 0.5) / extent * 2 - 1  # grid_sample's coordinates (align_corners=False)

    x, y = axis(boxes[:, 0], boxes[:, 2], width), axis(boxes[:, 1], boxes[:, 3], height)
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=False)


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """B x C x R x R -> B x C x S x S: a RandomResizedCrop per image (bilinear, see crop_resize)."""
    b, _, height, width = images.shape
    boxes = resized_crop_boxes(b, height, width, generator).to(images.device, images.dtype, non_blocking=True)
    return crop_resize(images, boxes, size)


def augment_batch(images: torch.Tensor, augment: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 source images (canonical S x S for pad-crop and none, R x R for resized-crop) -> float in [0, 1]."""
    images = images.float().div_(255)
    if augment == "pad-crop":
        return random_flip(random_pad_crop(images, generator), generator)
    if augment == "resized-crop":
        return random_flip(random_resized_crop(images, size, generator), generator)
    return images
