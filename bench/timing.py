"""Timing helpers shared by the benchmarks: wall-clock time of a callable with the device drained before and after."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from runs import pick_device


def bench_device(threads: int | None, name: str) -> torch.device:
    """Set torch's CPU threads (None: torch's default) and pick the device, as every benchmark starts."""
    if threads:
        torch.set_num_threads(threads)
    return pick_device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Milliseconds per call of `fn`, over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def stopwatch(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds) for one call."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
