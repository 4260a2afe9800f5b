"""Benchmark: step 3's confusing perturbations (Eq. 4-5), batched as gen_confusing.py computes them, against a
per-image loop in the structure of the paper's public code (for each step and each image of a batch, a forward of the
whole batch with that image's perturbation as the variable, and its own gradient).

    python bench/confusing.py                         # M = 60, b = 20, 20 steps, small backbone, 32 px, 48 bits
    python bench/confusing.py --arch vgg11 --image-size 224 --poison-num 20 --steps 2

Both sides take the gradient of the same objective (Eq. 5 of the whole batch) at the same perturbations and update
all images together after the step, so they must agree: the table gives the largest difference of the recorded
objective values and of the perturbations (a sign step turns a gradient component that rounds to the other side of
0 into a difference of 2 x step size at that pixel; the fraction of such pixels is reported). Random images and a
randomly initialised network stand in for the data and the clean model (the cost does not depend on the weights).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gen_confusing import OFFICIAL_STEP_RATIO, confusing_objective, confusing_perturbations  # noqa: E402
from models.hash_network import ARCHS, binarize, build_model  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import cli_entry, provenance, require_at_least_one, write_json  # noqa: E402

from bench.timing import bench_device, stopwatch  # noqa: E402

ARCH = "small"  # network the perturbations are made against (untrained weights)
BITS = 48  # code length K
IMAGE_SIZE = 32  # px of the square images
POISON_NUM = 60  # M
BATCH = 20  # b
STEPS = 20  # sign-gradient steps (gen_confusing.py --steps)
EPS = 8 / 255  # L_inf budget in pixels [0, 1]
LAM = 0.8  # lambda of Eq. 5
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # weights and images
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH, choices=ARCHS)
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--poison-num", type=int, default=POISON_NUM)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--lam", type=float, default=LAM)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "bits", "image_size", "poison_num", "batch", "steps")
    args.step_size = OFFICIAL_STEP_RATIO * args.eps * 255  # gen_confusing.py's default
    args.pert_scale = 1  # per pixel, as the per-image loop it is compared with
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.bits).to(device).eval()
    images = torch.rand(args.poison_num, 3, args.image_size, args.image_size, device=device)
    confusing_perturbations(model, images[:args.batch], argparse.Namespace(**{**vars(args), "steps": 1}))  # warm-up
    (eta, history), batched_seconds = stopwatch(lambda: confusing_perturbations(model, images, args), device)
    (eta_loop, values_loop), loop_seconds = stopwatch(lambda: per_image_perturbations(model, images, args), device)
    values = torch.tensor([h["objective"] for h in history])
    eta_diff = (eta - eta_loop).abs()
    row = {"batched_seconds": round(batched_seconds, 3), "per_image_seconds": round(loop_seconds, 3),
           "speedup": loop_seconds / batched_seconds,
           "objective_max_difference": float((values - torch.tensor(values_loop)).abs().max()),
           "objective_final_mean": float(values[:, -1].mean()),
           "eta_max_difference": float(eta_diff.max()) * 255,
           "eta_pixels_differing": float((eta_diff > 1e-6).float().mean())}
    print(f"confusing perturbations, M = {args.poison_num}, b = {args.batch}, {args.steps} steps, {args.arch} "
          f"{args.image_size} px, {device}, {torch.get_num_threads()} threads")
    print("| per-image loop (s) | batched (s) | speed-up | largest objective difference | largest eta difference "
          "(/255) | pixels differing |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {row['per_image_seconds']:.2f} | {row['batched_seconds']:.3f} | x{row['speedup']:.1f} | "
          f"{row['objective_max_difference']:.2e} | {row['eta_max_difference']:.3f} | "
          f"{100 * row['eta_pixels_differing']:.3f} % |")
    record = {"settings": vars(args), "threads": torch.get_num_threads(), "result": row,
              "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def per_image_perturbations(model: torch.nn.Module, images: torch.Tensor,
                            args: argparse.Namespace) -> tuple[torch.Tensor, list[list[float]]]:
    """The reference: per batch, per step, per image i a forward of the whole batch with only eta_i as the variable
    and the backward to it; all images step together afterwards. Returns eta and the objective per batch and step
    (with the value after the last step, as gen_confusing.py records it)."""
    model.eval().requires_grad_(False)
    step = args.step_size / 255
    eta = torch.zeros_like(images)
    history = []
    for start in range(0, len(images), args.batch):
        x = images[start:start + args.batch]
        with torch.no_grad():
            clean_codes = binarize(model.logits(x))
        delta = torch.zeros_like(x)
        values = []
        for _ in range(args.steps):
            grad = torch.empty_like(delta)
            for i in range(len(x)):
                own = delta[i].clone().requires_grad_(True)
                perturbed = torch.cat([x[:i] + delta[:i], (x[i] + own)[None], x[i + 1:] + delta[i + 1:]])
                objective = confusing_objective(model(perturbed), clean_codes, args.lam)
                grad[i], = torch.autograd.grad(objective, own)
            values.append(float(objective.detach()))
            delta = (delta + step * grad.sign()).clamp(-args.eps, args.eps)
            delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():
            values.append(float(confusing_objective(model(x + delta), clean_codes, args.lam)))
        history.append(values)
        eta[start:start + len(x)] = delta
    return eta, history


if __name__ == "__main__":
    cli_entry(main)
