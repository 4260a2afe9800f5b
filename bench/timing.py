"""Timing helpers shared by the benchmarks: wall-clock time of a callable with the device drained before and after."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def alternating(calls: list[Callable[[], Any]], repeats: int,
                device: torch.device) -> tuple[list[Any], list[list[float]]]:
    """Each call timed `repeats` times, taking turns (a slower spell of a shared machine then falls on all of them):
    (the results of each call's last run, each call's seconds per run)."""
    results: list[Any] = [None] * len(calls)
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            results[i], elapsed = stopwatch(call, device)
            seconds[i].append(elapsed)
    return results, seconds


def counted_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of `fn` as torch's FLOP counter sees them: matrix products and
    convolutions, forward and backward (2 per multiply-add); element-wise layers are not counted."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
