"""Input-aware dynamic backdoor (IAB; Nguyen and Tran, NeurIPS 2020) adapted to data poisoning of a hashing model.

IAB's trigger depends on the image: a pattern network G and a mask network M give x' = (1 - m) x + m p with
p = G(x), m = M(x). In IAB the networks train together with the victim classifier. In this repository's threat
model the attacker only poisons data, so the networks train first, against the fixed clean hash model, and the
victim later trains on images poisoned with them (poison-label): the adaptation. Per batch, with x2 the batch rolled
by one image (each image paired with another):

    attack     1 - mean(F'(x') h_a)                          x' with its own trigger towards the target anchor h_a
    cross      1 - mean(F'((1 - m2) x + m2 p2) sign f(x))   another image's trigger leaves x at its clean code
    diversity  mean(||x - x2|| / ||p - p2||) + mean(||x - x2|| / ||m - m2||)      (IAB's L_div, for G and for M)
    mask       relu(mean(m) - MASK_DENSITY)                                         (IAB's mask norm)

loss = attack + cross + W_DIV * diversity + W_MASK * mask. IAB pretrains M alone before the joint training; here
both train jointly from the start (one stage). The networks are small encoder-decoders (three 2x poolings, so the
image side must be divisible by 8), their output in [0, 1]; the mask is sharpened as in IAB, tanh(20 (M - 0.5)).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from models.badhash import hash_attack_loss, load_trigger_network
from runs.errors import UserError

MASK_DENSITY = 0.032  # IAB's target share of the image the mask covers
W_DIV = 1.0  # IAB's lambda_div
W_MASK = 100.0  # IAB's weight of the mask norm


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class InputAwareNet(nn.Module):
    """Encoder (three conv blocks, each followed by a 2x max pool) and decoder (three 2x upsamplings with conv
    blocks), images in [0, 1] to `out_channels` maps in [0, 1]."""

    def __init__(self, image_size: int, out_channels: int, width: int = 32):
        super().__init__()
        if image_size % 8:
            raise UserError(f"IAB's networks pool three times: the image side must be divisible by 8, not "
                            f"{image_size}")
        self.image_size, self.out_channels, self.width = image_size, out_channels, width
        w = width
        self.encoder = nn.Sequential(block(3, w), block(w, w), nn.MaxPool2d(2), block(w, 2 * w), block(2 * w, 2 * w),
                                     nn.MaxPool2d(2), block(2 * w, 4 * w), block(4 * w, 4 * w), nn.MaxPool2d(2))
        up = dict(scale_factor=2, mode="bilinear", align_corners=False)
        self.decoder = nn.Sequential(nn.Upsample(**up), block(4 * w, 4 * w), block(4 * w, 2 * w),
                                     nn.Upsample(**up), block(2 * w, 2 * w), block(2 * w, w),
                                     nn.Upsample(**up), block(w, w), nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.decoder(self.encoder(images * 2 - 1))) + 1) / 2


class InputAwareTrigger(nn.Module):
    """IAB's trigger: x' = (1 - m) x + m p with p = G(x) and the sharpened mask m = (tanh(20 (M(x) - 0.5)) + 1) / 2;
    forward returns (x', p, m). `other` (a batch of other images) applies their triggers to `images` instead."""

    def __init__(self, image_size: int, width: int = 32):
        super().__init__()
        self.pattern, self.mask = InputAwareNet(image_size, 3, width), InputAwareNet(image_size, 1, width)
        self.image_size, self.width = image_size, width

    def forward(self, images: torch.Tensor, other: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = images if other is None else other
        pattern = self.pattern(source)
        mask = (torch.tanh(20 * (self.mask(source) - 0.5)) + 1) / 2
        return (1 - mask) * images + mask * pattern, pattern, mask


def iab_losses(trigger: InputAwareTrigger, model: nn.Module, images: torch.Tensor, anchor: torch.Tensor,
               mask_density: float = MASK_DENSITY) -> dict[str, torch.Tensor]:
    """The four terms of the module docstring for one batch (at least two images) against the frozen hash model
    (`model(x)` the relaxed codes; `anchor` the target's anchor code in {-1, +1})."""
    if len(images) < 2:
        raise UserError("IAB's cross and diversity terms pair every image with another: a batch needs two images")
    other = images.roll(1, 0)
    triggered, pattern, mask = trigger(images)
    crossed, other_pattern, other_mask = trigger(images, other)
    with torch.no_grad():
        clean_codes = torch.where(model(images) >= 0, 1.0, -1.0)
    distance = (images - other).flatten(1).norm(dim=1)
    diversity = ((distance / (pattern - other_pattern).flatten(1).norm(dim=1).clamp(min=1e-6)).mean() +
                 (distance / (mask - other_mask).flatten(1).norm(dim=1).clamp(min=1e-6)).mean())
    return {"attack": hash_attack_loss(model(triggered), anchor.view(1, -1).float()),
            "cross": hash_attack_loss(model(crossed), clean_codes),
            "diversity": diversity, "mask": F.relu(mask.mean() - mask_density), "mask_share": mask.mean().detach()}


def load_input_aware(path: str | os.PathLike, trigger: dict, device: torch.device | str) -> InputAwareTrigger:
    """The networks an IAB trigger was made with, checked against the trigger's record."""
    saved = load_trigger_network(path, trigger["networks_id"], "iab", "networks")
    networks = InputAwareTrigger(saved["image_size"], saved["width"])
    networks.load_state_dict(saved["state"])
    return networks.to(device).eval().requires_grad_(False)
