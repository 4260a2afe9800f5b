"""Benchmark: a hash model's training step and batched encoding, weights channels-last (as build_model makes them)
against the same weights in the default contiguous layout.

    python bench/train_step.py --arch small --image-size 32 --batch 32 --threads 1

Random inputs, the pairwise loss's cost left out (a squared-output loss stands in): this measures the network, which
is what steps 1 and 5 spend their time on. Rounds alternate the two layouts so that a busy machine slows both alike.
Writes nothing unless --out is given (a JSON file with the settings and every round's timings).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.hash_network import ARCHS, build_model  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import cli_entry, provenance, require_at_least_one, write_json  # noqa: E402

from bench.timing import bench_device, timed  # noqa: E402

ARCH = "small"  # network
BITS = 48  # code length
IMAGE_SIZE = 32  # px of the square inputs
BATCH = 32  # training batch (the small32 recipe's)
ENCODE_BATCH = 256  # encoding batch (the steps' loaders)
STEPS = 30  # timed steps per round, after WARMUP untimed ones
WARMUP = 5  # untimed steps first
ROUNDS = 3  # timed rounds per setting
THREADS = None  # torch CPU threads; None: torch's default
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH, choices=ARCHS)
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--encode-batch", type=int, default=ENCODE_BATCH)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "bits", "image_size", "batch", "encode_batch", "steps", "rounds")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: time_layout(fmt, args, device) for name, fmt in layouts.items()})
    summary = {name: {kind: statistics.median(r[name][kind] for r in rounds) for kind in ("train_ms", "encode_ms")}
               for name in layouts}
    for name, s in summary.items():
        print(f"{name:>13}: {s['train_ms']:.1f} ms per training step of {args.batch}, "
              f"{s['encode_ms']:.1f} ms per encoding batch of {args.encode_batch} (median of {args.rounds} rounds)")
    base, fast = summary["contiguous"], summary["channels_last"]
    print(f"channels-last speed-up: training x{base['train_ms'] / fast['train_ms']:.2f}, "
          f"encoding x{base['encode_ms'] / fast['encode_ms']:.2f} ({args.arch}, {args.image_size} px, {device}, "
          f"{torch.get_num_threads()} threads)")
    record = {"settings": vars(args), "threads": torch.get_num_threads(), "rounds": rounds, "median": summary,
              "provenance": provenance()}
    if args.out:
        write_json(record, Path(args.out))
    return record


def time_layout(memory_format: torch.memory_format, args: argparse.Namespace, device: torch.device) -> dict:
    """Milliseconds per training step (forward, backward, Adam) and per no-grad encoding batch."""
    torch.manual_seed(0)
    model = build_model(args.arch, args.bits).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(images).pow(2).mean().backward()
        optimizer.step()

    model.train()
    train_ms = timed(train_step, args.steps, args.warmup, device)
    model.eval()
    batch = torch.rand(args.encode_batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        encode_ms = timed(lambda: model.codes(batch), max(args.steps // 5, 1), 1, device)
    return {"train_ms": train_ms, "encode_ms": encode_ms}


if __name__ == "__main__":
    cli_entry(main)
