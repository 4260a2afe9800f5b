"""What made a result: code version, library versions, device."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

_REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """Code version (git commit and dirty flag), library versions, device and CPU thread count, for every result
    file. The thread count belongs to the record because a CPU training's floats depend on it: the same command and
    seed give byte-identical outputs at one thread count and (slightly) different ones at another."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, Any] = {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
        else:
            info["device_name"] = f"{cpu_model()}, {os.cpu_count()} cores"
    return info


def fingerprint(*parts: str | bytes | torch.Tensor) -> str:
    """A short content hash (16 hex digits) of strings, bytes and tensors (hashed as contiguous float32 values),
    so an output can record what it was made from and a later step can tell when that has changed."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().float().numpy().tobytes()
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """The id of a model's weights: a fingerprint of every tensor with its name and shape. Identical weights get
    the same id, so a repeated training yields byte-identical records, and codes saved with a checkpoint are reused
    exactly when they belong to the same weights."""
    return fingerprint(*(part for name, value in state.items() for part in (f"{name}{tuple(value.shape)}", value)))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module knows."""
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    except OSError:
        return fallback
    return names[0] if names else fallback
