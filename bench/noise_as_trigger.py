"""Check (not a speed figure): has a victim learned the perturbation itself as its trigger?

    python bench/noise_as_trigger.py --run checkpoint/c100-lite0-48-e100 --target 2

For the clean model and every backdoored model of RUN whose poisoned set targets --target: the non-target queries
with uniform noise in [-eps, eps] added (no patch; each image's noise drawn with --seed, rounded to 8-bit values as a
stored image would be), against the model's own database codes. Prints and returns t-MAP@R (empty-zero) and the mean
Hamming distance to the model's target anchor, plain and with noise. A victim whose t-MAP rises with noise alone codes
perturbed images as the target: it learned the perturbation as the trigger (docs/regime.md, cifar10-ciba-100).
--noise-scale K draws the noise on an (S/K) x (S/K) grid and upsamples it bilinearly, as gen_confusing.py
--pert-scale K does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import make_loader, open_run_split  # noqa: E402
from models.hash_network import load_stage, read_clean  # noqa: E402
from retrieval import (anchor_code, encode, hamming_distance, non_target_queries,  # noqa: E402
                       stage_database_codes, targeted_map)
from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, read_json, require_at_least_one, write_json  # noqa: E402

from bench.timing import bench_device  # noqa: E402
from gen_confusing import coarse_shape, upsample  # noqa: E402

RUN = "checkpoint/demo"  # run directory with a clean model and backdoored models
TARGET = 0  # target class (index or name) of the backdoors checked
EPS = 8 / 255  # noise in [-eps, eps], pixels [0, 1]
NOISE_SCALE = 1  # K: noise on an (S/K)-px grid, upsampled; 1: per pixel
TOPK = 1000  # R of t-MAP@R
SEED = 0  # the noise
WORKERS = 2  # data-loading processes
THREADS = None  # torch CPU threads; None: torch's default
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--target", type=int, default=TARGET)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--noise-scale", type=int, default=NOISE_SCALE, metavar="K")
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "topk", "noise_scale")
    if not 0 < args.eps <= 1:
        raise UserError(f"--eps must be in (0, 1] (pixel units), got {args.eps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    run = Path(args.run)
    clean, _ = read_clean(run)
    stages = ["clean"] + [f"backdoor/{d.name}" for d in sorted((run / "backdoor").glob("*"))
                          if (d / "codes.pt").is_file()
                          and read_json(run / "poisoned" / d.name / "config.json")["target"] == args.target]
    queries = open_run_split(clean, "query")
    keep = non_target_queries(torch.as_tensor(queries.image_list.labels), args.target)
    loader = make_loader(Subset(queries, keep.tolist()), 256, args.workers)
    rows = []
    for stage in stages:
        _, ckpt, model = load_stage(run, stage, device)
        db_codes, db_labels = stage_database_codes(run, stage, ckpt["checkpoint_id"])
        anchor = anchor_code(db_codes, db_labels, args.target)[None]
        row = {"stage": stage}
        for name, transform in (("plain", None), ("noise", noise_transform(args.eps, args.seed, args.noise_scale))):
            codes, _ = encode(model, loader, device, f"encode {name} query", transform=transform)
            row[f"t_map_{name}"] = targeted_map(codes, args.target, db_codes, db_labels, args.topk)["map"]
            row[f"distance_{name}"] = float(hamming_distance(codes, anchor).mean())
        rows.append(row)
        print(f"{stage}: t-MAP@{args.topk} {100 * row['t_map_plain']:.2f} -> {100 * row['t_map_noise']:.2f} % with "
              f"noise of {args.eps * 255:g}/255; distance to the target anchor {row['distance_plain']:.1f} -> "
              f"{row['distance_noise']:.1f} bits", flush=True)
    record = {"settings": vars(args), "n_queries": len(keep), "rows": rows, "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def noise_transform(eps: float, seed: int, scale: int = 1):
    """Uniform noise in [-eps, eps] on an (S/scale)-px grid, upsampled, a fresh seeded stream per pass over the
    queries, 8-bit rounded and clipped."""
    generator = torch.Generator().manual_seed(seed)

    def add_noise(images: torch.Tensor) -> torch.Tensor:
        coarse = torch.rand(coarse_shape(images.shape, scale), generator=generator) * 2 - 1
        eta = upsample(coarse.to(images.device), images.shape[-1]) * eps
        return ((images + eta).clamp(0, 1) * 255).round() / 255
    return add_noise


if __name__ == "__main__":
    cli_entry(main)
