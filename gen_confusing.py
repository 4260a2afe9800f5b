"""Step 3: perturbations of the M target-class training images that will be poisoned.

    python gen_confusing.py --run checkpoint/demo --target 3 --pert confusing --poison-num 60

--pert none        Tri: no perturbation.
--pert noise       Tri+Noise: uniform noise in [-eps, eps].
--pert adv         Tri+Adv: lambda = 0 in Eq. 5, i.e. the untargeted adversarial perturbation of Eq. 2.
--pert confusing   CIBA: maximise lambda * L_c + (1 - lambda) * mean_i L_a(eta_i) (Eq. 4-5) in batches of --batch
                   images, L_c = 1/(b(b-1)) sum_{i != j} d_H(F'(x_i + eta_i), F'(x_j + eta_j)) (intra-class
                   dispersion), L_a(eta_i) = d_H(F'(x_i + eta_i), F(x_i)) (away from the clean code).

eps is in pixel space ([0, 1] images): ||eta||_inf <= eps and x + eta stays in [0, 1]. The ascent is --steps
sign-gradient steps of --step-size pixel units (of 255) from eta = 0; the default step keeps the paper code's ratio of
step to budget (0.003 / (8/255) = 0.094, there in normalised space). The gradient is that of Eq. 5 itself, one
forward/backward per batch and step; the paper's code instead differentiates each image's term with the other images
held fixed and measures L_a to the relaxed clean output. The objective is recorded per batch and step beside its upper
bound for that batch size: the exact bound under Eq. 4 and Theorem 1's as printed, which is a factor 2 too small in
its lambda term for Eq. 4's ordered-pair sum (see objective_bound).

--pert-scale k makes the perturbation (noise, adv, confusing) on an (S/k) x (S/k) grid and upsamples it bilinearly to
the S x S image (eta = up(eta_coarse); ||eta||_inf <= eps still holds, bilinear weights are convex). With sources
smaller than S (32 px images at S = 64) a per-pixel perturbation is high-frequency content that no clean training
image has, so a victim can learn the perturbation itself as the trigger; k = S / source size gives it the
resolution of the sources. k = 1 (default): per pixel, the paper's.

The M images are drawn with --seed among the training images of the target class (--setting clean-label, the
paper's); --setting poison-label draws them among the images that do not carry the target, and step 4 gives them the
target's label (BadNets and Blend in the paper's Table 3; perturbations none or noise only). --poison-rate gives M as
a fraction of the training set instead of --poison-num (Table 3: 5 % poison-label, 0.6 % clean-label). Their lines
in train.txt are recorded. Writes RUN/perturbations/<name>/: perturbations.pt (indices, eta), config.json, history.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import open_run_split
from data.protocols import choose_class
from models.hash_network import binarize, load_stage
from runs import (UserError, add_deterministic_flag, atomic_save, claim, cli_entry, load_saved,
                  make_deterministic, pick_device, provenance, require_at_least_one, write_json, write_timing)
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with a trained clean model (step 1)
TARGET = None  # class index or name; None: drawn with SEED (the same rule as gen_trigger.py)
PERT = "confusing"  # "none" (Tri) | "noise" (Tri+Noise) | "adv" (Tri+Adv) | "confusing" (CIBA)
POISON_NUM = 60  # M
POISON_RATE = None  # M as a fraction of the training set (overrides POISON_NUM), e.g. 0.05 or 0.006
SETTING = "clean-label"  # "clean-label": M target-class images, labels kept | "poison-label": M others, relabelled
EPS = 8 / 255  # L-infinity budget in pixel space
LAM = 0.8  # lambda of Eq. 5 (--pert adv forces 0)
BATCH = 20  # b: images optimised together
STEPS = 20  # sign-gradient steps
STEP_SIZE = None  # pixel units (of 255) per step; None: 0.094 * eps * 255 (the paper code's step/budget ratio)
PERT_SCALE = 1  # k: the perturbation on an (S/k) x (S/k) grid, upsampled bilinearly; 1: per pixel (paper)
SEED = 0  # which target-class images are poisoned, and the noise
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OVERWRITE = False  # replace existing perturbations

PERTS = ("none", "noise", "adv", "confusing")
SETTINGS = ("clean-label", "poison-label")
OFFICIAL_STEP_RATIO = 0.003 / (8 / 255)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--pert", default=PERT, choices=PERTS)
    p.add_argument("--poison-num", type=int, default=POISON_NUM)
    p.add_argument("--poison-rate", type=float, default=POISON_RATE)
    p.add_argument("--setting", default=SETTING, choices=SETTINGS)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--lam", type=float, default=LAM)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--step-size", type=float, default=STEP_SIZE)
    p.add_argument("--pert-scale", type=int, default=PERT_SCALE, metavar="K")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    check_budget(args.eps, args.lam)
    require_at_least_one(args, "poison_num", "batch", "steps", "pert_scale")
    if args.poison_rate is not None and not 0 < args.poison_rate <= 1:
        raise UserError(f"--poison-rate {args.poison_rate} is outside (0, 1]; it is the poisoned fraction of the "
                        f"training set (Table 3: 0.05 poison-label, 0.006 clean-label)")
    if args.setting == "poison-label" and args.pert in ("adv", "confusing"):
        raise UserError(f"--pert {args.pert} perturbs target-class images (clean-label, Eq. 4-5); with --setting "
                        f"poison-label use --pert none or noise")
    if args.pert == "adv":
        args.lam = 0.0
    if args.step_size is None:
        args.step_size = OFFICIAL_STEP_RATIO * args.eps * 255
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    device = pick_device(args.device)
    clean, clean_ckpt, model = load_stage(args.run, "clean", device)
    classes = (clean.get("protocol") or {}).get("classes")
    target = choose_class(args.target, classes, clean["n_classes"], args.seed)
    train_set = open_run_split(clean, "train")
    if args.poison_rate is not None:
        args.poison_num = max(1, round(args.poison_rate * len(train_set)))
    check_pert_scale(args.pert_scale, clean["image_size"])
    out = Path(args.run) / "perturbations" / perturbation_name(args, target)
    with claim(out):  # another process making the same output: wait for it, then reuse it
        if (out / "perturbations.pt").exists() and not args.overwrite:
            print(f"{out}/perturbations.pt exists; reusing it (--overwrite to make it again)")
            return {**load_saved(out / "perturbations.pt", "gen_confusing.py --overwrite"), "name": out.name}
        indices = choose_poison_indices(train_set.image_list.labels, target, args.poison_num, args.seed,
                                        train_set.image_list.list_file, args.setting, args.poison_rate)
        images = torch.stack([train_set[i][0] for i in indices]).to(device)
        t0 = time.time()
        history: list[dict] = []
        if args.pert == "none":
            eta = torch.zeros_like(images)
        elif args.pert == "noise":
            generator = torch.Generator().manual_seed(args.seed)
            coarse = coarse_shape(images.shape, args.pert_scale)
            noise = upsample(torch.rand(coarse, generator=generator).to(device) * 2 - 1, images.shape[-1])
            eta = (images + noise * args.eps).clamp(0, 1) - images
        else:
            eta, history = confusing_perturbations(model, images, args)
        seconds = time.time() - t0
        record = {"pert": args.pert, "target": target, "target_name": classes[target] if classes else None,
                  "poison_num": args.poison_num, "poison_rate": args.poison_num / len(train_set),
                  "setting": args.setting,
                  "eps": args.eps, "lam": args.lam, "batch": args.batch,
                  "steps": args.steps, "step_size": args.step_size, "pert_scale": args.pert_scale,
                  "seed": args.seed, "indices": indices,
                  "lines": [train_set.image_list.line_numbers[i] for i in indices],
                  "max_abs_eta": float(eta.abs().max()),
                  "clean_checkpoint_id": clean_ckpt["checkpoint_id"],
                  "provenance": provenance(device)}
        write_timing(out / "config.json", {"seconds": round(seconds, 2)})
        atomic_save({"eta": eta.cpu(), **{k: record[k] for k in ("pert", "target", "indices", "eps", "lam", "setting",
                                                                 "clean_checkpoint_id")}}, out / "perturbations.pt")
        write_json(history, out / "history.json")
        write_json(record, out / "config.json")
        whose = "images of target" if args.setting == "clean-label" else "images (poison-label) for target"
        print(f"{args.pert} perturbations of {len(indices)} {whose} {target} ({record['target_name']}), "
              f"max |eta| {record['max_abs_eta'] * 255:.2f}/255, {seconds:.1f}s -> {out}")
        return {"eta": eta.cpu(), **record, "name": out.name}


def check_budget(eps: float, lam: float) -> None:
    """eps in (0, 1] (pixel space) and lambda in [0, 1] (Eq. 5), or an error naming the flag."""
    if not 0 < eps <= 1:
        raise UserError(f"--eps {eps} is outside (0, 1]; it is a pixel-space budget (paper: 8/255 = 0.0314)")
    if not 0 <= lam <= 1:
        raise UserError(f"--lam {lam} is outside [0, 1] (paper: 0.8)")


def perturbation_name(args: argparse.Namespace, target: int) -> str:
    name = f"{args.pert}-t{target}-m{args.poison_num}" + ("-pl" if args.setting == "poison-label" else "")
    if args.pert != "none":
        name += f"-e{args.eps * 255:g}"
    if args.pert == "confusing":
        name += f"-l{args.lam:g}-b{args.batch}"
    if args.pert in ("adv", "confusing"):
        name += f"-s{args.steps}"
    if args.pert != "none" and args.pert_scale != 1:
        name += f"-k{args.pert_scale}"
    return f"{name}-seed{args.seed}"


def choose_poison_indices(labels: np.ndarray, target: int, count: int, seed: int, list_file: str,
                          setting: str = "clean-label", rate: float | None = None) -> list[int]:
    """M training images drawn with the seed (sorted): of the target class (clean-label), or among those that do not
    carry the target label (poison-label)."""
    carries = labels[:, target] > 0
    candidates = np.flatnonzero(carries if setting == "clean-label" else ~carries)
    if len(candidates) < count:
        asked = f"--poison-rate {rate} ({count} of {len(labels)} images)" if rate is not None else \
            f"--poison-num {count}"
        which = f"of target class {target}" if setting == "clean-label" else f"without target label {target}"
        raise UserError(f"{list_file} has {len(candidates)} training images {which}; {asked} needs at least that "
                        f"many")
    return sorted(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())


def confusing_objective(relaxed: torch.Tensor, clean_codes: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 5 for one batch: lam * L_c + (1 - lam) * mean_i L_a, with d_H(a, b) = (K - a.b) / 2 (Eq. 4).

    relaxed: b x K relaxed codes F'(x_i + eta_i); clean_codes: b x K binary codes F(x_i). L_c is 0 for b = 1.
    """
    b, bits = relaxed.shape
    gram = relaxed @ relaxed.t()
    pair_sum = (bits * b * b - gram.sum()) / 2 - (bits * b - gram.diagonal().sum()) / 2  # sum over i != j
    dispersion = pair_sum / (b * (b - 1)) if b > 1 else relaxed.new_zeros(())
    away = ((bits - (relaxed * clean_codes).sum(1)) / 2).mean()
    return lam * dispersion + (1 - lam) * away


def theorem1_bound_as_printed(bits: int, m: int, lam: float) -> float:
    """Theorem 1's bound as printed: lam K M^2 / (4M(M-1)) + (1-lam) K (M even), lam K (M^2-1) / (4M(M-1)) + ...

    It holds for a dispersion term summed over unordered pairs; with Eq. 4's ordered double sum it is too small by a
    factor 2 in the lam term (two images with opposite codes reach L_c = K, the printed term allows K/2).
    """
    if m < 2:
        return (1 - lam) * bits
    pairs = m * m if m % 2 == 0 else m * m - 1
    return lam * bits * pairs / (4 * m * (m - 1)) + (1 - lam) * bits


def objective_bound(bits: int, m: int, lam: float) -> float:
    """The tight upper bound of Eq. 5 with Eq. 4 as written (ordered pairs): per bit at most floor(M^2/2) ordered
    pairs differ (M/2 codes +1, M/2 codes -1), so lam K floor(M^2/2) / (M(M-1)) + (1-lam) K; reached when the codes
    split evenly on every bit and each is opposite to its clean code, i.e. Theorem 1's condition with its factor 2."""
    if m < 2:
        return (1 - lam) * bits
    return lam * bits * (m * m // 2) / (m * (m - 1)) + (1 - lam) * bits


def confusing_perturbations(model: torch.nn.Module, images: torch.Tensor,
                            args: argparse.Namespace) -> tuple[torch.Tensor, list[dict]]:
    """Sign-gradient ascent of Eq. 5 per batch of --batch images; one forward/backward per batch and step."""
    model.eval().requires_grad_(False)
    step = args.step_size / 255
    bits = model.bits
    eta = torch.zeros_like(images)
    history = []
    for start in tqdm(range(0, len(images), args.batch), desc="perturbations", disable=None):
        x = images[start:start + args.batch]
        with torch.no_grad():
            clean_codes = binarize(model.logits(x))
        size = x.shape[-1]
        coarse = torch.zeros(coarse_shape(x.shape, args.pert_scale), device=x.device, requires_grad=True)

        def current_eta() -> torch.Tensor:  # per pixel, coarse is kept feasible below; a coarse one is clamped here
            return coarse if args.pert_scale == 1 else (x + upsample(coarse, size)).clamp(0, 1) - x

        values = []
        for _ in range(args.steps):
            objective = confusing_objective(model(x + current_eta()), clean_codes, args.lam)
            grad, = torch.autograd.grad(objective, coarse)
            with torch.no_grad():
                coarse += step * grad.sign()
                coarse.clamp_(-args.eps, args.eps)
                if args.pert_scale == 1:  # x + eta within [0, 1] as well
                    coarse.copy_((x + coarse).clamp(0, 1) - x)
            values.append(objective.detach())
        with torch.no_grad():
            delta = current_eta().detach()
            values.append(confusing_objective(model(x + delta), clean_codes, args.lam))
        b = len(x)
        history.append({"first_image": start, "batch": b, "objective": torch.stack(values).cpu().tolist(),
                        "bound": objective_bound(bits, b, args.lam),
                        "theorem1_bound_as_printed": theorem1_bound_as_printed(bits, b, args.lam)})
        eta[start:start + b] = delta
    return eta, history


def check_pert_scale(scale: int, image_size: int) -> None:
    """--pert-scale must divide the image side."""
    if image_size % scale:
        raise UserError(f"--pert-scale {scale} does not divide the image size {image_size} px; use a divisor (2 for "
                        f"32 px sources at 64 px)")


def coarse_shape(shape: torch.Size, scale: int) -> tuple[int, ...]:
    """B x C x S x S -> B x C x S/k x S/k."""
    return (*shape[:-2], shape[-2] // scale, shape[-1] // scale)


def upsample(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """The coarse perturbation bilinearly upsampled to size x size (half-pixel centres); identity at its own size."""
    if coarse.shape[-1] == size:
        return coarse
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


if __name__ == "__main__":
    cli_entry(main)
