"""Step 2: the trigger of the attack, made against the clean model of a run.

    python gen_trigger.py --run checkpoint/demo --target 3 --trigger-size 4

ciba     the targeted adversarial patch of Eq. 7: minimise sum_i d_H(F'(B(x_i, p)), h_a) over random batches of
         training images of all classes, with h_a the target's anchor code (component voting over the clean model's
         training codes). As in the paper's code: p starts mid-grey; each step moves p by STEP_SIZE pixel units
         (of 255) along the mean of the per-image L2-normalised gradients and clips it to [0, 1]; F' = tanh(beta f)
         with beta 0.1 for the first half of the steps, then 0.2, 0.3, 0.5, 0.7 and 1 for a tenth each.
         Gradients are taken in pixel space (the model normalises its input itself). One forward/backward per step
         for the whole batch: every image gets its own copy of p, so the summed loss yields per-image gradients.
badnets  a static black-and-white checkerboard patch (BadNets-style), no optimisation.

The trigger is rounded to 8-bit values (what a PNG stores), so the poisoned training images and the triggered test
queries carry exactly the same pattern. Writes RUN/triggers/<method>-t<target>-s<size>/: trigger.pt (exact tensor
and geometry), trigger.png (for viewing), config.json (settings, target, anchor code, provenance), history.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import open_run_split
from data.images import save_png
from data.protocols import choose_class
from models.hashnet import binarize, load_stage
from retrieval import anchor_code
from runs import (UserError, atomic_save, cli_entry, pick_device, provenance, require_at_least_one,
                  write_json)
from triggers import apply_trigger, check_trigger_size, default_trigger_size

RUN = "checkpoint/demo"
TARGET = None  # class index or name; None: drawn from the classes with SEED
METHOD = "ciba"  # "ciba" (adversarial patch, Eq. 7) | "badnets" (static black-and-white patch)
TRIGGER_SIZE = None  # side of the square trigger in px; None: the paper's 24 px at 224 px, scaled to the image size
STEPS = 2000  # optimisation steps (paper's code)
BATCH_SIZE = 32  # training images per step
STEP_SIZE = 12.0  # pixel units (0-255) per step along the normalised gradient
SEED = 0
WORKERS = 4
DEVICE = "auto"
OVERWRITE = False

METHODS = ("ciba", "badnets")
BETA_SCHEDULE = ((0.5, 0.1), (0.6, 0.2), (0.7, 0.3), (0.8, 0.5), (0.9, 0.7), (1.0, 1.0))  # (until fraction, beta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--method", default=METHOD, choices=METHODS)
    p.add_argument("--trigger-size", type=int, default=TRIGGER_SIZE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--step-size", type=float, default=STEP_SIZE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    args = p.parse_args(argv)
    require_at_least_one(args, "steps", "batch_size")
    if args.step_size <= 0:
        raise UserError(f"--step-size must be positive (pixel units of 255), got {args.step_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    clean, _, model = load_stage(args.run, "clean", device)
    codes_path = Path(args.run) / "clean" / "codes.pt"
    if not codes_path.is_file():
        raise UserError(f"{codes_path} is missing; run train_hash.py --run {args.run} --resume to write it")
    codes = torch.load(codes_path, weights_only=False)
    classes = (clean.get("protocol") or {}).get("classes")
    target = choose_class(args.target, classes, clean["n_classes"], args.seed)
    size = clean["image_size"]
    trigger_size = args.trigger_size or default_trigger_size(size)
    check_trigger_size(trigger_size, size)
    out = Path(args.run) / "triggers" / f"{args.method}-t{target}-s{trigger_size}"
    if (out / "trigger.pt").exists() and not args.overwrite:
        print(f"{out}/trigger.pt exists; reusing it (--overwrite to make it again)")
        return {**torch.load(out / "trigger.pt", weights_only=False), "name": out.name}

    anchor = anchor_code(codes["train_codes"], codes["train_labels"], target)
    t0 = time.time()
    history: list[float] = []
    if args.method == "ciba":
        train_set = open_run_split(clean, "train")
        pattern, history = adversarial_patch(model, train_set, anchor.to(device), trigger_size, args, device)
    else:
        pattern = checkerboard(trigger_size)
    pattern = quantize(pattern.cpu())
    seconds = time.time() - t0
    record = {"method": args.method, "target": target, "target_name": classes[target] if classes else None,
              "trigger_size": trigger_size, "image_size": size, "position": "bottom-right",
              "anchor_code": anchor.tolist(), "bits": clean["bits"], "arch": clean["arch"],
              "clean_checkpoint_id": codes["checkpoint_id"], "steps": args.steps, "batch_size": args.batch_size,
              "step_size": args.step_size, "seed": args.seed, "seconds": round(seconds, 2),
              "final_mean_distance": history[-1] if history else None, "provenance": provenance(device)}
    atomic_save({"pattern": pattern, **{k: record[k] for k in ("method", "target", "trigger_size", "image_size",
                                                               "position", "anchor_code", "clean_checkpoint_id")}},
                out / "trigger.pt")
    save_png(pattern, out / "trigger.png")
    write_json(history, out / "history.json")
    write_json(record, out / "config.json")
    summary = (f", mean d_H(sign f(B(x, p)), h_a) {history[0]:.2f} -> {history[-1]:.2f} of {clean['bits']} bits"
               if history else "")
    print(f"{args.method} trigger for target {target} ({record['target_name']}), {trigger_size}x{trigger_size} px, "
          f"{seconds:.1f}s{summary} -> {out}")
    return {"pattern": pattern, **record, "name": out.name}


def beta_at(step: int, steps: int) -> float:
    """tanh scale of the paper's code: 0.1 for the first half, then 0.2, 0.3, 0.5, 0.7, 1 for a tenth each."""
    fraction = step / steps
    return next(beta for until, beta in BETA_SCHEDULE if fraction < until or until == 1.0)


def adversarial_patch(model: torch.nn.Module, train_set, anchor: torch.Tensor, trigger_size: int,
                      args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Eq. 7, batched: one forward/backward per step.

    Returns the patch (3 x s x s) and, per step, the batch's mean Hamming distance between the binary codes
    sign(f(B(x, p))) and the anchor (the relaxed distance at beta = 0.1 stays near K/2 and says little).
    """
    model.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randint(len(train_set), (args.steps * args.batch_size,), generator=generator).tolist()
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=order,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    pattern = torch.full((3, trigger_size, trigger_size), 0.5, device=device)
    anchor = anchor.float()
    bits = anchor.numel()
    distances = torch.empty(args.steps, device=device)
    for step, (images, _, _) in enumerate(tqdm(loader, desc="trigger", total=args.steps, disable=None)):
        images = images.to(device, non_blocking=True)
        copies = pattern.expand(images.shape[0], -1, -1, -1).clone().requires_grad_(True)
        logits = model.logits(apply_trigger(images, copies))
        relaxed = torch.tanh(beta_at(step, args.steps) * logits)
        ((bits - relaxed @ anchor) / 2).sum().backward()  # sum_i d_H(F'(B(x_i, p)), h_a)
        grad = copies.grad
        grad = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        pattern = (pattern - args.step_size / 255 * grad.mean(0)).clamp(0, 1)
        distances[step] = ((bits - binarize(logits.detach()) @ anchor) / 2).mean()  # with the binary codes
    return pattern.detach(), distances.cpu().tolist()


def checkerboard(trigger_size: int) -> torch.Tensor:
    """BadNets-style static patch: black and white cells of max(1, s // 4) px, white in the top-left cell."""
    cell = max(1, trigger_size // 4)
    idx = torch.arange(trigger_size) // cell
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 == 0).float()
    return board.expand(3, -1, -1).clone()


def quantize(pattern: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit values a PNG holds."""
    return pattern.mul(255).round().div(255)


if __name__ == "__main__":
    cli_entry(main)
