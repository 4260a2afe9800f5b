"""Preview grids of what a trigger does to a few training images (trigger.png, BadHash's samples.png)."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid


def sample_images(train_set, seed: int, count: int = 8) -> torch.Tensor:
    """`count` training images drawn with the seed, for the sample grids."""
    picks = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.stack([train_set[i][0] for i in picks])


def sample_grid(images: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Rows: originals | generated | 0.5 + 10 x (generated - original), the difference made visible."""
    difference = (0.5 + 10 * (generated - images)).clamp(0, 1)
    return make_grid(torch.cat([images, generated, difference]).cpu(), nrow=len(images), padding=2, pad_value=1)
