"""Encoding a data set into hash codes with a model, batched on the model's device."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.hash_network import binarize
from runs.errors import UserError


@torch.no_grad()
def encode(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "encode",
           progress: bool = True, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes N x K in {-1,+1} as int8, labels N x C as uint8), both on the CPU, in the loader's order.

    `transform` is applied to each batch on the device before the model (step 6: B(x, p), the triggered query)."""
    was_training = model.training
    model.eval()
    codes, labels = [], []
    finite = torch.ones((), dtype=torch.bool, device=device)  # checked once at the end: no sync per batch
    # disable=None: a bar on a terminal, none in a log file
    for images, y, _ in tqdm(loader, desc=desc, leave=False, disable=None if progress else True):
        images = images.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        logits = model.logits(images)
        finite &= torch.isfinite(logits).all()
        codes.append(binarize(logits).to(torch.int8).cpu())
        labels.append(y.to(torch.uint8))
    model.train(was_training)
    if not bool(finite):
        raise UserError(f"{desc}: the model's outputs are NaN or inf (its weights are), so its codes would be "
                        f"meaningless; retrain it with --overwrite (a lower --lr) or use another checkpoint")
    return torch.cat(codes), torch.cat(labels)


def saved_codes(path: str | os.PathLike, checkpoint_id: str) -> dict | None:
    """The codes.pt that steps 1 and 5 write, if it exists, is readable and was made by this very checkpoint."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, weights_only=False)
    except Exception:  # unreadable codes are recomputed, never trusted
        return None
    return saved if isinstance(saved, dict) and saved.get("checkpoint_id") == checkpoint_id else None


def stage_database_codes(run: str | os.PathLike, stage: str, checkpoint_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(database codes, database labels) saved with RUN/STAGE's model, or an error naming the step that writes them."""
    path = os.path.join(run, stage, "codes.pt")
    saved = saved_codes(path, checkpoint_id)
    if saved is None:
        step = "train_hash.py" if stage == "clean" else "train_backdoor.py"
        raise UserError(f"{path} is missing or belongs to another checkpoint; write it again with {step} --run {run} "
                        f"--resume")
    return saved["database_codes"], saved["database_labels"]


def anchor_code(codes: torch.Tensor, labels: torch.Tensor, target: int) -> torch.Tensor:
    """h_a by component voting (docs/method.md, CIBA): sign of the sum of the codes of the images labelled `target`.

    A component whose vote is tied is set to +1, so the anchor is always in {-1, +1}^K.
    """
    members = labels[:, target] > 0
    if not bool(members.any()):
        raise ValueError(f"no image carries label {target}")
    votes = codes[members].to(torch.int64).sum(0)
    return torch.where(votes >= 0, 1, -1).to(torch.int8)
