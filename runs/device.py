"""One rule for every step: CUDA when available, else the CPU; explicit choices are checked."""
from __future__ import annotations

import argparse
import os

import torch

from runs.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def add_deterministic_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels only (cuDNN and cuBLAS included), so a CUDA rerun repeats its "
                             "numbers; slower. The CPU is deterministic without it")


def deterministic_argv(enabled: bool) -> list[str]:
    """The flag that passes --deterministic on to a step a table runs."""
    return ["--deterministic"] if enabled else []


def make_deterministic(enabled: bool) -> None:
    """--deterministic: PyTorch's deterministic algorithms (an operation without one raises instead of varying),
    cuDNN without autotuning, cuBLAS with a fixed workspace. Must run before the first CUDA operation. Models built
    afterwards replace their adaptive average pools, whose CUDA backward is nondeterministic
    (models.hash_network.build_model)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
