"""What made a result: code version, library versions, device."""
from __future__ import annotations

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
    """Code version (git commit and dirty flag), library versions and device, for every result file."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
        else:
            info["device_name"] = platform.processor() or platform.machine()
    return info
