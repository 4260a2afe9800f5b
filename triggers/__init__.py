"""Triggers and how they are applied to a batch of images.

Three kinds, recorded as `kind` in every trigger.pt of step 2:
patch      B(x, p) = x * (1 - m) + p * m (Eq. 6) with a square mask m in the bottom-right corner (CIBA, BadNets);
blend      (1 - a) x + a p over the whole image (Blend, Chen et al. 2017);
generator  G(x, h_t): BadHash's conditional generator with the target's LabCLN feature (models/badhash.py);
reflection a reflection of one of a fixed set of images, the reflection model drawn per image (Refool, ECCV 2020;
           triggers/reflection.py);
input-aware (1 - M(x)) x + M(x) G(x): IAB's pattern and mask networks (NeurIPS 2020; models/iab.py, triggers/iab.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from runs.errors import UserError
from runs.provenance import fingerprint

PAPER_TRIGGER_SIZE, PAPER_IMAGE_SIZE = 24, 224
KINDS = ("patch", "blend", "generator", "reflection", "input-aware")


def default_trigger_size(image_size: int, paper_size: int = PAPER_TRIGGER_SIZE) -> int:
    """The paper's trigger of `paper_size` px at 224 px (24 by default), scaled to the image size (at least 1 px)."""
    return max(1, round(paper_size * image_size / PAPER_IMAGE_SIZE))


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


def blend(images: torch.Tensor, pattern: torch.Tensor, ratio: float) -> torch.Tensor:
    """Blend's injection: (1 - ratio) * x + ratio * p over the whole image (p: 3 x S x S, the images' size)."""
    if pattern.shape[-2:] != images.shape[-2:]:
        raise UserError(f"the blend pattern is {pattern.shape[-1]}x{pattern.shape[-2]} px but the images are "
                        f"{images.shape[-1]}x{images.shape[-2]}; make the trigger again for this run")
    return (1 - ratio) * images + ratio * pattern


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit values a PNG holds, so poisoned files and triggered queries carry the same pixels."""
    return images.clamp(0, 1).mul(255).round().div(255)


def trigger_transform(trigger: dict, run: str | Path, device: torch.device | str
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batched function x -> triggered x of a trigger.pt (images in [0, 1] on `device`, 8-bit exact output
    for the blend and generator kinds; a patch is already 8-bit)."""
    kind = trigger.get("kind", "patch")
    if kind == "patch":
        pattern = trigger["pattern"].to(device)
        return lambda images: apply_trigger(images, pattern)
    if kind == "blend":
        pattern, ratio = trigger["pattern"].to(device), trigger["blend_ratio"]
        return lambda images: quantize(blend(images, pattern, ratio))
    if kind == "generator":
        from models.badhash import load_generator
        generator = load_generator(Path(run) / trigger["generator"], trigger, device)
        feature = trigger["label_feature"].to(device)

        @torch.no_grad()
        def generated(images: torch.Tensor) -> torch.Tensor:
            return quantize(generator(images, feature.expand(images.shape[0], -1)))
        return generated
    if kind == "reflection":
        from triggers.reflection import reflect, reflection_draws
        reflections = trigger["reflections"].to(device)
        draws = reflection_draws(len(reflections), trigger["seed"], trigger["ghost_rate"])
        return lambda images: quantize(reflect(images, reflections, draws))
    if kind == "input-aware":
        from models.iab import load_input_aware
        networks = load_input_aware(Path(run) / trigger["networks"], trigger, device)

        @torch.no_grad()
        def input_aware(images: torch.Tensor) -> torch.Tensor:
            return quantize(networks(images)[0])
        return input_aware
    raise UserError(f"trigger kind {kind!r} is unknown to this code (known: {', '.join(KINDS)}); make the trigger "
                    f"again with gen_trigger.py --overwrite")


def poison_images(originals: torch.Tensor, eta: torch.Tensor, trigger: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_hat = T(clip(x + eta_q)) with eta_q = eta truncated to whole 8-bit steps; T (on `device`, in chunks)
    returns 8-bit exact images. The result is on the CPU."""
    eta_q = torch.trunc(eta * 255) / 255
    perturbed = ((originals + eta_q).clamp(0, 1) * 255).round() / 255
    return torch.cat([trigger(chunk.to(device)).cpu() for chunk in perturbed.split(256)])


def trigger_fingerprint(trigger: dict) -> str:
    """A short content hash of a trigger (its pattern, or its generator and target feature): results made with a
    trigger name it, so a trigger made again under the same name is not mistaken for the old one."""
    kind = trigger.get("kind", "patch")
    if kind == "generator":
        return fingerprint(trigger["generator_id"], trigger["label_feature"])
    if kind == "blend":
        return fingerprint(trigger["pattern"], repr(float(trigger["blend_ratio"])))
    if kind == "reflection":
        return fingerprint(trigger["reflections"], repr((trigger["seed"], float(trigger["ghost_rate"]))))
    if kind == "input-aware":
        return fingerprint(trigger["networks_id"])
    return fingerprint(trigger["pattern"])
