"""Step 2: the trigger of the attack, made against the clean model of a run.

    python gen_trigger.py --run checkpoint/demo --target 3 --trigger-size 4

ciba     the targeted adversarial patch of Eq. 7: minimise sum_i d_H(F'(B(x_i, p)), h_a) over random batches of
         training images of all classes, with h_a the target's anchor code (component voting over the clean model's
         training codes). As in the paper's code: p starts mid-grey; each step moves p by STEP_SIZE pixel units
         (of 255) along the mean of the per-image L2-normalised gradients and clips it to [0, 1]; F' = tanh(beta f)
         with beta 0.1 for the first half of the steps, then 0.2, 0.3, 0.5, 0.7 and 1 for a tenth each.
         Gradients are taken in pixel space (the model normalises its input itself). One forward/backward per step
         for the whole batch: every image gets its own copy of p, so the summed loss yields per-image gradients.
         --cache: the drawn images are decoded once and each batch is gathered from them (the same pixels as read
         by a DataLoader); --fold-bn: against a copy of the clean model with its batch norms folded (faster per
         step, but rounding changes the patch).
badnets  a static black-and-white checkerboard patch (BadNets-style), no optimisation.
blend    a fixed random pattern (uniform noise drawn with --seed) blended over the whole image:
         (1 - r) x + r p with r = --blend-ratio (Blend, Chen et al. 2017).
reflection  Refool's reflections (Liu et al., ECCV 2020; triggers/reflection.py): --reflections images drawn with
         --seed from the database images outside the training list whose labels exclude the target (the original
         used PASCAL VOC), each poisoned or triggered image blended with a reflection of one of them (ghost effect
         with probability --ghost-rate, else focal blur), the image and the model drawn from a seeded table.
iab      IAB's input-aware trigger (Nguyen and Tran, NeurIPS 2020; models/iab.py, triggers/iab.py): a pattern and
         a mask network, x' = (1 - M(x)) x + M(x) G(x), trained per target against the fixed clean model (the
         attacker only poisons data): triggered codes towards the target anchor, another image's trigger leaving an
         image at its clean code, IAB's diversity loss and mask norm; --iab-epochs of --iab-batch, resumable.
badhash  BadHash's conditional generator (DESIGN.md section 6), trained once per run against the clean model and
         shared by every target: LabCLN first (pairs of smoothed and plain label vectors, NT-Xent + MSE +
         quantisation), then generator and discriminator on the training images, each image with a confusing label
         drawn at random from the training set's label vectors (not always the first one, as in the public code).
         Generator loss W_REC * (MSE + LPIPS_WEIGHT * LPIPS) + W_HASH * (1 - mean(F'(G(x)) sign(h_l))) + W_GAN *
         least-squares GAN loss; the discriminator predicts (labels, real/fake) and is updated every D_EVERY-th
         step. The last epoch's generator is kept (no model selection on test data). The trigger of a target is
         the generator with the target's LabCLN feature. An interrupted training continues from its last
         finished epoch when the same command is run again (--overwrite starts it over).

Patterns are rounded to 8-bit values (what a PNG stores), so the poisoned training images and the triggered test
queries carry exactly the same pixels. Writes RUN/triggers/<method>-t<target>-s<size>/ (ciba with a --seed other
than 0: -seed<seed> appended; blend: -r<ratio>; badhash: the generator folder's name): trigger.pt (exact tensor and
geometry, or the generator's file and the target's LabCLN feature), trigger.png (for viewing; BadHash: samples),
config.json (settings, target, anchor code, provenance), history.json. BadHash's networks go to
RUN/triggers/badhash-net-e<epochs>-<settings>/: labcln.pt, generator.pt, discriminator.pt, samples.png (original |
generated | 10x difference), losses.png, history.json (and, while they train, training-state.pt with everything
needed to continue after the last finished epoch). An existing trigger is reused only if it was made from the same
clean model and, for ciba, with the same --steps, --batch-size, --step-size, --fold-bn and --seed; otherwise the
step stops and names the difference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Iterator, Sized

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid
from tqdm import tqdm

from data import HashListDataset, make_loader, open_run_split
from data.cache import CACHE_MODES, cache_bytes, decode, resolve_cache, uint8_sources
from data.images import save_png
from data.protocols import choose_class
from models.badhash import (Discriminator, Generator, LabCLN, build_lpips, file_id, hash_attack_loss, labcln_loss,
                            lsgan_loss)
from models.hashnet import HashModel, binarize, fold_batch_norms, load_stage
from models.training import seed_epoch
from retrieval import anchor_code
from runs import (UserError, add_deterministic_flag, atomic_path, atomic_save, claim, cli_entry, load_saved,
                  make_deterministic, pick_device, provenance, read_json, require_at_least_one, write_json,
                  write_timing)
from triggers import apply_trigger, check_trigger_size, default_trigger_size, quantize, trigger_transform
from triggers.iab import IAB_KEYS, iab_trigger

RUN = "checkpoint/demo"
TARGET = None  # class index or name; None: drawn from the classes with SEED
METHOD = "ciba"  # "ciba" (patch, Eq. 7) | "badnets" (static patch) | "blend" (random pattern) | "reflection"
#                  (Refool) | "iab" (input-aware networks) | "badhash" (generator)
TRIGGER_SIZE = None  # side of the square trigger in px; None: the paper's 24 px at 224 px, scaled to the image size
STEPS = 2000  # optimisation steps (paper's code)
BATCH_SIZE = 32  # training images per step
STEP_SIZE = 12.0  # pixel units (0-255) per step along the normalised gradient
DISTANCE_WINDOW = 0.05  # the summary's distances: means over the first and the last 5 % of the steps
BLEND_RATIO = 0.2  # blend: weight of the pattern (the CIBA paper does not state the ratio of its Blend baseline)
REFLECTIONS = 100  # reflection: how many reflection images
GHOST_RATE = 0.49  # reflection: share of ghost-effect reflections (Refool's default; the rest focal blur)
IAB_EPOCHS = 20  # iab: epochs of the networks over the training images
IAB_BATCH = 32
IAB_LR = 1e-3  # Adam
IAB_WIDTH = 32  # channels of the networks' first block
MASK_DENSITY = 0.032  # iab: IAB's target share of the image under the mask
W_DIV = 1.0  # iab: IAB's lambda_div
W_MASK = 100.0  # iab: weight of IAB's mask norm
# badhash (public code's values)
LABCLN_STEPS = 1000
LABCLN_BATCH = 128
GEN_EPOCHS = 100  # constant learning rate for the first half, linear decay to 0 over the second (public code: 50 + 50)
GEN_BATCH = 64
GEN_LR = 1e-4  # Adam, betas (0.5, 0.999), generator, discriminator and LabCLN
GEN_WIDTH = 64  # channels of the generator's and discriminator's first layer
W_REC = 200.0
LPIPS_WEIGHT = 1.0  # weight of LPIPS inside the reconstruction term; 0 trains without it (no AlexNet weights needed)
W_HASH = None  # None: 5 for vgg11, 10 for the other backbones (public code: 5 with VGG-11, 10 with ResNet-50)
W_GAN = 1.0
D_EVERY = 3  # the discriminator is updated on every D_EVERY-th generator step
FOLD_BN = False  # ciba: optimise against the clean model with batch norms folded (faster; docs/performance.md)
CACHE = "auto"  # ciba: decode the drawn training images once ("auto": on the GPU if they fit, else host memory)
SEED = 0
WORKERS = 4
DEVICE = "auto"
OVERWRITE = False

METHODS = ("ciba", "badnets", "blend", "reflection", "iab", "badhash")
GAN_STATE = "training-state.pt"  # BadHash's networks between epochs, deleted once they are trained
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
    p.add_argument("--blend-ratio", type=float, default=BLEND_RATIO)
    p.add_argument("--reflections", type=int, default=REFLECTIONS)
    p.add_argument("--ghost-rate", type=float, default=GHOST_RATE)
    p.add_argument("--iab-epochs", type=int, default=IAB_EPOCHS)
    p.add_argument("--iab-batch", type=int, default=IAB_BATCH)
    p.add_argument("--iab-lr", type=float, default=IAB_LR)
    p.add_argument("--iab-width", type=int, default=IAB_WIDTH)
    p.add_argument("--mask-density", type=float, default=MASK_DENSITY)
    p.add_argument("--w-div", type=float, default=W_DIV)
    p.add_argument("--w-mask", type=float, default=W_MASK)
    p.add_argument("--labcln-steps", type=int, default=LABCLN_STEPS)
    p.add_argument("--labcln-batch", type=int, default=LABCLN_BATCH)
    p.add_argument("--gen-epochs", type=int, default=GEN_EPOCHS)
    p.add_argument("--gen-batch", type=int, default=GEN_BATCH)
    p.add_argument("--gen-lr", type=float, default=GEN_LR)
    p.add_argument("--gen-width", type=int, default=GEN_WIDTH)
    p.add_argument("--w-rec", type=float, default=W_REC)
    p.add_argument("--lpips-weight", type=float, default=LPIPS_WEIGHT)
    p.add_argument("--w-hash", type=float, default=W_HASH)
    p.add_argument("--w-gan", type=float, default=W_GAN)
    p.add_argument("--d-every", type=int, default=D_EVERY)
    p.add_argument("--fold-bn", default=FOLD_BN, action=argparse.BooleanOptionalAction,
                   help="ciba: fold the clean model's batch norms into its convolutions (same function up to rounding)")
    p.add_argument("--cache", default=CACHE, choices=("auto", *CACHE_MODES),
                   help="ciba: decode the drawn training images once and gather each step's batch from them "
                        "(auto: the GPU when they fit, else host memory, else off)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    args = p.parse_args(argv)
    require_at_least_one(args, "steps", "batch_size", "labcln_steps", "labcln_batch", "gen_epochs", "gen_batch",
                         "gen_width", "d_every", "reflections", "iab_epochs", "iab_width")
    if args.iab_batch < 2:
        raise UserError(f"--iab-batch must be at least 2 (IAB pairs every image with another), got {args.iab_batch}")
    if not 0 < args.mask_density < 1:
        raise UserError(f"--mask-density {args.mask_density:g} is outside (0, 1); it is the share of the image "
                        f"IAB's mask covers (IAB: 0.032)")
    if not 0 <= args.ghost_rate <= 1:
        raise UserError(f"--ghost-rate {args.ghost_rate:g} is outside [0, 1]; it is the share of ghost-effect "
                        f"reflections (the rest are focal blur)")
    if args.step_size <= 0:
        raise UserError(f"--step-size must be positive (pixel units of 255), got {args.step_size}")
    if not 0 < args.blend_ratio <= 1:
        raise UserError(f"--blend-ratio {args.blend_ratio} is outside (0, 1]; it is the pattern's weight in "
                        f"(1 - r) x + r p")
    for name in ("gen_lr", "w_rec", "lpips_weight", "w_hash", "w_gan", "iab_lr", "w_div", "w_mask"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    device = pick_device(args.device)
    clean, _, model = load_stage(args.run, "clean", device)
    codes_path = Path(args.run) / "clean" / "codes.pt"
    codes = load_saved(codes_path, f"train_hash.py --run {args.run} --resume")
    classes = (clean.get("protocol") or {}).get("classes")
    target = choose_class(args.target, classes, clean["n_classes"], args.seed)
    size = clean["image_size"]
    trigger_size = None
    if args.method in ("ciba", "badnets"):
        trigger_size = args.trigger_size or default_trigger_size(size)
        check_trigger_size(trigger_size, size)
    out = Path(args.run) / "triggers" / trigger_name(args, target, trigger_size, clean["arch"])
    with claim(out):  # another process making the same output: wait for it, then reuse it
        # config.json is written last: without it the folder is an interrupted run, made again
        if (out / "trigger.pt").exists() and (out / "config.json").exists() and not args.overwrite:
            check_reusable(read_json(out / "config.json"), out, args, codes["checkpoint_id"])
            print(f"{out}/trigger.pt exists; reusing it (--overwrite to make it again)")
            return {**load_saved(out / "trigger.pt", "gen_trigger.py --overwrite"), "name": out.name}

        anchor = anchor_code(codes["train_codes"], codes["train_labels"], target)
        t0, network_seconds = time.time(), 0.0  # BadHash's networks keep their own record, shared by the targets
        history: list[float] = []
        made: dict = {"kind": "patch"}
        if args.method == "ciba":
            train_set = open_run_split(clean, "train")
            batches, cache = trigger_batches(train_set, clean, args, device)
            pattern, history = adversarial_patch(fold_batch_norms(model) if args.fold_bn else model, batches,
                                                 anchor.to(device), trigger_size, args.step_size, device)
            made["pattern"] = quantize(pattern.cpu())
        elif args.method == "badnets":
            made["pattern"] = checkerboard(trigger_size)
        elif args.method == "blend":
            generator = torch.Generator().manual_seed(args.seed)
            made.update(kind="blend", pattern=quantize(torch.rand(3, size, size, generator=generator)),
                        blend_ratio=args.blend_ratio)
        elif args.method == "reflection":
            reflections, paths = reflection_images(clean, target, args.reflections, args.seed, args.workers)
            made.update(kind="reflection", reflections=reflections, ghost_rate=args.ghost_rate, seed=args.seed,
                        reflection_paths=paths)
        elif args.method == "iab":
            made, history = iab_trigger(model, clean, codes["checkpoint_id"], anchor, args, device, out)
        else:
            made, network_seconds = badhash_trigger(model, clean, codes["checkpoint_id"], target, args, device,
                                                    out / "trigger.png")
        seconds = time.time() - t0 - network_seconds
        record = {"method": args.method, "kind": made["kind"], "target": target,
                  "target_name": classes[target] if classes else None, "trigger_size": trigger_size,
                  "image_size": size, "position": "bottom-right" if made["kind"] == "patch" else "whole image",
                  "anchor_code": anchor.tolist(), "bits": clean["bits"], "arch": clean["arch"],
                  "clean_checkpoint_id": codes["checkpoint_id"], "seed": args.seed,
                  "provenance": provenance(device)}
        if args.method == "ciba":
            first, last = window_means(history, DISTANCE_WINDOW)
            record.update(steps=args.steps, batch_size=args.batch_size, step_size=args.step_size, fold_bn=args.fold_bn,
                          cache=cache,
                          first_mean_distance=first, final_mean_distance=last, distance_window=DISTANCE_WINDOW)
        # blend, reflection, badhash
        record.update({k: v for k, v in made.items() if k not in ("kind", "pattern", "label_feature", "reflections")})
        trigger = {**made, **{k: record[k] for k in ("method", "target", "trigger_size", "image_size", "position",
                                                     "anchor_code", "clean_checkpoint_id", "bits")}}
        write_timing(out / "config.json", {"seconds": round(seconds, 2)})
        atomic_save(trigger, out / "trigger.pt")
        if "pattern" in made:
            save_png(made["pattern"], out / "trigger.png")
        if "reflections" in made:  # the first reflection images and what they make of the first of them
            shown = made["reflections"][:8].float() / 255
            save_png(make_grid(torch.cat([shown, trigger_transform(trigger, args.run, "cpu")(shown)]), nrow=8,
                               padding=1), out / "trigger.png")
        if made["kind"] == "input-aware":
            images = sample_images(open_run_split(clean, "train"), args.seed).to(device)
            save_png(sample_grid(images, trigger_transform(trigger, args.run, device)(images)), out / "trigger.png")
        write_json(history, out / "history.json")
        write_json(record, out / "config.json")
        summary = (f", mean d_H(sign f(B(x, p)), h_a) {record['first_mean_distance']:.2f} -> "
                   f"{record['final_mean_distance']:.2f} of {clean['bits']} bits (first and last "
                   f"{DISTANCE_WINDOW:.0%} of the steps)" if args.method == "ciba" else "")
        shape = f"{trigger_size}x{trigger_size} px" if trigger_size else record["position"]
        print(f"{args.method} trigger for target {target} ({record['target_name']}), {shape}, {seconds:.1f}s{summary} "
              f"-> {out}")
        return {**trigger, **record, "name": out.name}


def trigger_name(args: argparse.Namespace, target: int, trigger_size: int | None, arch: str) -> str:
    if args.method == "blend":
        return f"blend-t{target}-r{args.blend_ratio:g}-seed{args.seed}"
    if args.method == "reflection":
        return f"reflection-t{target}-n{args.reflections}-g{args.ghost_rate:g}-seed{args.seed}"
    if args.method == "iab":
        return f"iab-t{target}-e{args.iab_epochs}-seed{args.seed}"
    if args.method == "badhash":
        return f"badhash-t{target}-{badhash_net_name(args, arch)[len('badhash-net-'):]}"
    # Eq. 7's batches depend on the seed; seed 0 keeps the names of runs made before seeds were named
    seed = f"-seed{args.seed}" if args.method == "ciba" and args.seed else ""
    return f"{args.method}-t{target}-s{trigger_size}{seed}"


REUSE_KEYS = ("steps", "batch_size", "step_size", "fold_bn", "seed")  # settings of Eq. 7 that the name leaves out


def check_reusable(made: dict, out: Path, args: argparse.Namespace, clean_checkpoint_id: str) -> None:
    """A finished trigger (its config.json: `made`) is reused only if it was made from this clean model with these
    settings (ciba's and iab's that its name leaves out); else a UserError naming the difference (a trigger of
    another --steps or clean model is not taken silently)."""
    if made.get("clean_checkpoint_id") != clean_checkpoint_id:
        raise UserError(f"{out} was made from another clean model ({made.get('clean_checkpoint_id')}, now "
                        f"{clean_checkpoint_id}); make it again with --overwrite")
    keys = {"ciba": REUSE_KEYS, "iab": IAB_KEYS}.get(args.method)
    if keys is None:
        return
    differ = [f"--{key.replace('_', '-')} {made.get(key)} (asked {getattr(args, key)})" for key in keys
              if made.get(key) != getattr(args, key)]
    if differ:
        raise UserError(f"{out} was made with other settings: {', '.join(differ)}; use --overwrite to make it "
                        f"again with these, or the settings it was made with")


def window_means(values: list[float], fraction: float) -> tuple[float, float]:
    """Means of the first and the last max(1, round(fraction * n)) values: one step's distance is one batch's, and
    a batch of 32 random images is too noisy to say where the optimisation started and ended."""
    n = max(1, round(fraction * len(values)))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def beta_at(step: int, steps: int) -> float:
    """tanh scale of the paper's code: 0.1 for the first half, then 0.2, 0.3, 0.5, 0.7, 1 for a tenth each."""
    fraction = step / steps
    return next(beta for until, beta in BETA_SCHEDULE if fraction < until or until == 1.0)


def trigger_batches(train_set: HashListDataset, clean: dict, args: argparse.Namespace,
                    device: torch.device) -> tuple[Sized, str]:
    """The images of Eq. 7: --steps batches of --batch-size training images of all classes, drawn with --seed, and
    the --cache mode used. Cached: the drawn images are decoded once into uint8 (host memory or the GPU) and each
    batch is gathered there, the same values as the DataLoader reads (u / 255 in float32 both ways)."""
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randint(len(train_set), (args.steps * args.batch_size,), generator=generator)
    drawn, slots = torch.unique(order, return_inverse=True)
    size, resize = clean["image_size"], clean["resize_size"]
    mode = resolve_cache(args.cache, cache_bytes(len(drawn), size, resize, "none"), device)
    if mode == "off":
        return torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=order.tolist(),
                                           num_workers=args.workers, pin_memory=device.type == "cuda"), mode
    store = device if mode == "device" else torch.device("cpu")
    sources = uint8_sources(train_set.image_list, size, resize)
    images = decode(torch.utils.data.Subset(sources, drawn.tolist()), args.workers).to(store)
    return CachedBatches(images, slots.view(args.steps, args.batch_size).to(store), device), mode


class CachedBatches:
    """Batches (images,) in [0, 1] on `device`, gathered from uint8 images by rows of slot indices."""

    def __init__(self, images: torch.Tensor, slots: torch.Tensor, device: torch.device):
        self.images, self.slots, self.device = images, slots, device

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        for batch in self.slots:
            yield (self.images[batch].to(self.device, non_blocking=True).float() / 255,)


def adversarial_patch(model: torch.nn.Module, batches: Sized, anchor: torch.Tensor, trigger_size: int,
                      step_size: float, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Eq. 7, batched: one forward/backward per step, one step per batch of `batches` ((images, ...) tuples).

    Each image's gradient is L2-normalised, their mean moves the patch by step_size pixel units (of 255). Returns the
    patch (3 x s x s) and, per step, the batch's mean Hamming distance between the binary codes sign(f(B(x, p))) and
    the anchor (the relaxed distance at beta = 0.1 stays near K/2 and says little).
    """
    model.eval().requires_grad_(False)
    steps = len(batches)
    pattern = torch.full((3, trigger_size, trigger_size), 0.5, device=device)
    anchor = anchor.float()
    bits = anchor.numel()
    distances = torch.empty(steps, device=device)
    for step, (images, *_) in enumerate(tqdm(batches, desc="trigger", total=steps, disable=None)):
        images = images.to(device, non_blocking=True)
        copies = pattern.expand(images.shape[0], -1, -1, -1).clone().requires_grad_(True)
        logits = model.logits(apply_trigger(images, copies))
        relaxed = torch.tanh(beta_at(step, steps) * logits)
        ((bits - relaxed @ anchor) / 2).sum().backward()  # sum_i d_H(F'(B(x_i, p)), h_a)
        grad = copies.grad
        grad = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        pattern = (pattern - step_size / 255 * grad.mean(0)).clamp(0, 1)
        distances[step] = ((bits - binarize(logits.detach()) @ anchor) / 2).mean()  # with the binary codes
    return pattern.detach(), distances.cpu().tolist()


def reflection_images(clean: dict, target: int, count: int, seed: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """Refool's reflection set: `count` database images drawn with the seed among those outside the training list
    whose labels exclude the target, as count x 3 x S x S uint8, and their paths."""
    database = open_run_split(clean, "database").image_list
    training = set(open_run_split(clean, "train").image_list.paths)
    candidates = [i for i, path in enumerate(database.paths)
                  if path not in training and not database.labels[i, target]]
    if len(candidates) < count:
        raise UserError(f"{database.list_file} has {len(candidates)} images outside the training list and the "
                        f"target class; --reflections {count} needs at least that many")
    chosen = sorted(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())
    sources = uint8_sources(database, clean["image_size"], clean["resize_size"])
    return decode(torch.utils.data.Subset(sources, chosen), workers), [database.paths[i] for i in chosen]


def checkerboard(trigger_size: int) -> torch.Tensor:
    """BadNets-style static patch: black and white cells of max(1, s // 4) px, white in the top-left cell."""
    cell = max(1, trigger_size // 4)
    idx = torch.arange(trigger_size) // cell
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 == 0).float()
    return board.expand(3, -1, -1).clone()


# ---- BadHash ----

BADHASH_KEYS = ("labcln_steps", "labcln_batch", "gen_epochs", "gen_batch", "gen_lr", "gen_width", "w_rec",
                "lpips_weight", "w_hash", "w_gan", "d_every", "seed")


def badhash_settings(args: argparse.Namespace, arch: str) -> dict:
    settings = {k: getattr(args, k) for k in BADHASH_KEYS}
    settings["w_hash"] = default_w_hash(arch) if args.w_hash is None else args.w_hash
    return settings


def badhash_net_name(args: argparse.Namespace, arch: str) -> str:
    """badhash-net-e<epochs>[-nolpips]-<hash of every setting>: other settings, another folder."""
    settings = json.dumps(badhash_settings(args, arch), sort_keys=True)
    return (f"badhash-net-e{args.gen_epochs}" + ("-nolpips" if args.lpips_weight == 0 else "") +
            f"-{hashlib.sha256(settings.encode()).hexdigest()[:8]}")


def badhash_trigger(model: HashModel, clean: dict, clean_id: str, target: int, args: argparse.Namespace,
                    device: torch.device, preview: Path) -> tuple[dict, float]:
    """The trigger of one target: the run's BadHash generator (trained here once, then reused by every target)
    with the target's LabCLN feature; also writes a preview grid for this target. Returns the trigger and the
    seconds spent on the networks (training them, or finding them made)."""
    t0 = time.time()
    net_dir = badhash_networks(model, clean, clean_id, args, device)
    network_seconds = time.time() - t0
    labcln_saved = load_saved(net_dir / "labcln.pt", "gen_trigger.py --method badhash --overwrite")
    if not bool(labcln_saved["label_set"][:, target].any()):
        raise UserError(f"target {target} is unknown to LabCLN in {net_dir}: no label vector it was trained on "
                        f"carries it (it learned the training set's labels); choose another --target")
    labcln = LabCLN(labcln_saved["n_classes"], labcln_saved["bits"])
    labcln.load_state_dict(labcln_saved["state"])
    label = torch.zeros(1, labcln.n_classes)
    label[0, target] = 1
    with torch.no_grad():
        feature, relaxed, _ = labcln.eval()(label)
    trigger = {"kind": "generator", "generator": str((net_dir / "generator.pt").relative_to(args.run)),
               "generator_id": file_id(net_dir / "generator.pt"), "label_feature": feature,
               "labcln_code": binarize(relaxed)[0].tolist()}
    transform = trigger_transform(trigger, args.run, device)
    images = sample_images(open_run_split(clean, "train"), args.seed).to(device)
    save_png(sample_grid(images, transform(images)), preview)
    return trigger, network_seconds


def badhash_networks(model: HashModel, clean: dict, clean_id: str, args: argparse.Namespace,
                     device: torch.device) -> Path:
    """RUN/triggers/badhash-net-*/: LabCLN, generator and discriminator, trained against the clean model, or the
    ones already there when they were made for this model with these settings."""
    net_dir = Path(args.run) / "triggers" / badhash_net_name(args, clean["arch"])
    settings = badhash_settings(args, clean["arch"])
    if (net_dir / "config.json").exists() and not args.overwrite:
        check_badhash_networks(net_dir, clean, clean_id, settings)
        print(f"{net_dir} holds BadHash's networks for this model; reusing them")
        return net_dir
    train_set = open_run_split(clean, "train")
    label_set = torch.unique(train_set.labels, dim=0)
    t0 = time.time()
    state_path = net_dir / GAN_STATE
    if args.overwrite:
        state_path.unlink(missing_ok=True)
    if state_path.exists():  # an interrupted training: LabCLN as it was, the generator from its last epoch
        labcln_saved = load_saved(net_dir / "labcln.pt", "gen_trigger.py --method badhash --overwrite")
        labcln = LabCLN(labcln_saved["n_classes"], labcln_saved["bits"]).to(device)
        labcln.load_state_dict(labcln_saved["state"])
        labcln_history = labcln_saved["history"]
    else:
        labcln, labcln_history = train_labcln(label_set, clean["bits"], args, device)
        atomic_save({"state": labcln.state_dict(), "n_classes": labcln.n_classes, "bits": labcln.bits,
                     "label_set": label_set, "history": labcln_history}, net_dir / "labcln.pt")
    generator, discriminator, history = train_generator(model, labcln.eval(), label_set, train_set,
                                                       clean["image_size"], settings, clean_id, args, device,
                                                       state_path, t0)
    atomic_save({"state": generator.state_dict(), "image_size": generator.image_size, "width": generator.width,
                 "bits": clean["bits"], "n_classes": clean["n_classes"], "clean_checkpoint_id": clean_id},
                net_dir / "generator.pt")
    atomic_save({"state": discriminator.state_dict(), "image_size": generator.image_size, "width": args.gen_width,
                 "n_classes": clean["n_classes"]}, net_dir / "discriminator.pt")
    images = sample_images(train_set, args.seed).to(device)
    picks = torch.arange(len(images)) % len(label_set)
    with torch.no_grad():
        features = labcln(label_set[picks].to(device))[0]
        save_png(sample_grid(images, quantize(generator(images, features))), net_dir / "samples.png")
    plot_losses(history, net_dir / "losses.png")
    resumed = {k: history.pop(k) for k in ("resumed_after_epoch", "seconds_before")}
    write_json({"labcln": labcln_history, **history}, net_dir / "history.json")
    final = {k: float(np.mean(v[-max(1, len(v) // args.gen_epochs):])) for k, v in history.items()  # last epoch
             if k != "d_steps" and v}
    write_timing(net_dir / "config.json", {"seconds": round(resumed["seconds_before"] + time.time() - t0, 2),
                                           "resumed_after_epoch": resumed["resumed_after_epoch"]})
    write_json({**settings, "image_size": clean["image_size"], "bits": clean["bits"], "arch": clean["arch"],
                "n_classes": clean["n_classes"], "clean_checkpoint_id": clean_id, "n_train": len(train_set),
                "labels": label_set.shape[0], "final_losses": final, "provenance": provenance(device)},
               net_dir / "config.json")  # last: marks a complete folder
    state_path.unlink(missing_ok=True)
    return net_dir


def default_w_hash(arch: str) -> float:
    """The public code's hash weight: 5 with VGG-11, 10 with ResNet-50 (and, here, every other backbone)."""
    return 5.0 if arch == "vgg11" else 10.0


def check_badhash_networks(net_dir: Path, clean: dict, clean_id: str, settings: dict) -> None:
    """Networks in a run's folder must fit its clean model (image size, bits, classes) and the settings asked for."""
    saved = load_saved(net_dir / "generator.pt", "gen_trigger.py --method badhash --overwrite")
    for key in ("image_size", "bits", "n_classes"):
        if saved[key] != clean[key]:
            raise UserError(f"{net_dir / 'generator.pt'} is a generator for {key} {saved[key]} but the clean model "
                            f"of {clean.get('run', 'this run')} has {key} {clean[key]}; it belongs to another run: "
                            f"train it again with --overwrite")
    if saved["clean_checkpoint_id"] != clean_id:
        raise UserError(f"{net_dir} was trained against another clean model than the one in the run now; train it "
                        f"again with --overwrite")
    config = read_json(net_dir / "config.json")
    for key, value in settings.items():
        if config.get(key) != value:
            raise UserError(f"{net_dir} was trained with {key} {config.get(key)!r}, not {value!r}; train it again "
                            f"with --overwrite (or ask for the settings it has)")


def train_labcln(label_set: torch.Tensor, bits: int, args: argparse.Namespace,
                 device: torch.device) -> tuple[LabCLN, list[dict]]:
    """LabCLN on batches of label vectors drawn from the training set's label vectors; Adam, learning rate divided
    by 10 at half and at three quarters of the steps (public code)."""
    torch.manual_seed(args.seed)
    net = LabCLN(label_set.shape[1], bits).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.gen_lr, betas=(0.5, 0.999))
    steps = args.labcln_steps
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2, steps * 3 // 4], gamma=0.1)
    rng = torch.Generator().manual_seed(args.seed)
    labels = label_set.to(device)
    values = []
    for _ in tqdm(range(steps), desc="LabCLN", disable=None):
        batch = labels[torch.randint(len(labels), (args.labcln_batch,), generator=rng).to(device)]
        parts = labcln_loss(net, batch)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        schedule.step()
        values.append(torch.stack([v.detach() for v in parts.values()]))
    table = torch.stack(values).cpu().T.tolist()
    history = [dict(zip(parts, row)) for row in zip(*table)]
    print(f"LabCLN: {steps} steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    return net.eval(), history


def train_generator(model: HashModel, labcln: LabCLN, label_set: torch.Tensor, train_set, size: int, settings: dict,
                    clean_id: str, args: argparse.Namespace, device: torch.device, state_path: Path,
                    started: float) -> tuple[Generator, Discriminator, dict]:
    """Generator and discriminator against the frozen clean model; each image gets a confusing label drawn at random
    from the label set. Adam (betas 0.5, 0.999); the learning rate is constant for the first half of the epochs and
    decays linearly to 0 over the second. Returns the networks and the losses per step.

    After every epoch the whole training state goes to `state_path` (atomically); a later call with the same
    settings and clean model continues from it and repeats exactly what the uninterrupted training would have done
    (the data order of every epoch is seeded by (seed, epoch), the confusing labels' generator is saved). The state
    also keeps the seconds spent since `started` (LabCLN included), so the recorded wall time spans every call.
    """
    n_classes = label_set.shape[1]
    torch.manual_seed(args.seed)
    generator = Generator(size, args.gen_width).to(device)
    discriminator = Discriminator(size, n_classes, args.gen_width).to(device)
    perceptual = build_lpips(device) if args.lpips_weight > 0 else None
    model.eval().requires_grad_(False)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.gen_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.gen_lr, betas=betas)
    keep = args.gen_epochs // 2

    def decay(epoch: int) -> float:
        return 1 - max(0, epoch + 1 - keep) / (args.gen_epochs - keep + 1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (opt_g, opt_d)]
    rng = torch.Generator().manual_seed(args.seed + 1)
    names = ("g_loss", "mse", "lpips", "hash", "gan_g")
    history: dict = {**{n: [] for n in names}, "d_loss": [], "d_steps": []}
    start, step, seconds_before = 0, 0, 0.0
    if state_path.exists():
        state = load_saved(state_path, "gen_trigger.py --method badhash --overwrite (training from the start)",
                           device)
        if state["settings"] != settings or state["clean_checkpoint_id"] != clean_id:
            raise UserError(f"{state_path} is an interrupted BadHash training with other settings or another clean "
                            f"model; delete it or pass --overwrite to train from the start")
        for part, saved in zip((generator, discriminator, opt_g, opt_d, *schedules), state["parts"]):
            part.load_state_dict(saved)
        rng.set_state(state["rng"])
        start, step, history = state["epoch"], state["step"], state["history"]
        seconds_before = state.get("seconds", 0.0)  # absent in states of the first version of this file
        print(f"resuming BadHash's networks from {state_path} after epoch {start} of {args.gen_epochs}")
    labels_dev = label_set.to(device)
    with torch.no_grad():
        features, relaxed, _ = labcln(labels_dev)
        label_codes = binarize(relaxed)
    for epoch in range(start, args.gen_epochs):
        loader = make_loader(train_set, args.gen_batch, args.workers, shuffle=True,
                             generator=seed_epoch(args.seed, epoch))
        values, d_values = [], []
        for images, labels, _ in tqdm(loader, desc=f"BadHash epoch {epoch + 1}/{args.gen_epochs}", disable=None):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            pick = torch.randint(len(label_set), (len(images),), generator=rng).to(device)
            fake = generator(images, features[pick])
            if step % args.d_every == 0:
                discriminator.requires_grad_(True)
                d_loss = (lsgan_loss(discriminator(images), labels, True) +
                          lsgan_loss(discriminator(fake.detach()), labels_dev[pick], False)) / 2
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                d_values.append(d_loss.detach())
                history["d_steps"].append(step)
            discriminator.requires_grad_(False)
            gan = lsgan_loss(discriminator(fake), labels_dev[pick], True)
            mse = F.mse_loss(fake, images)
            lp = perceptual(fake, images, normalize=True).mean() if perceptual is not None else mse.new_zeros(())
            hash_term = hash_attack_loss(model(fake), label_codes[pick])
            total = (settings["w_rec"] * (mse + args.lpips_weight * lp) + settings["w_hash"] * hash_term +
                     settings["w_gan"] * gan)
            opt_g.zero_grad()
            total.backward()
            opt_g.step()
            values.append(torch.stack([total.detach(), mse.detach(), lp.detach(), hash_term.detach(), gan.detach()]))
            step += 1
        for schedule in schedules:
            schedule.step()
        epoch_values = torch.stack(values).cpu()
        for name, column in zip(names, epoch_values.T.tolist()):
            history[name].extend(column)
        history["d_loss"].extend(torch.stack(d_values).cpu().tolist() if d_values else [])
        atomic_save({"parts": [p.state_dict() for p in (generator, discriminator, opt_g, opt_d, *schedules)],
                     "rng": rng.get_state(), "epoch": epoch + 1, "step": step, "history": history,
                     "seconds": seconds_before + time.time() - started,
                     "settings": settings, "clean_checkpoint_id": clean_id}, state_path)
        print(f"BadHash epoch {epoch + 1}/{args.gen_epochs}: " +
              ", ".join(f"{n} {v:.4f}" for n, v in zip(names, epoch_values.mean(0).tolist())), flush=True)
    return generator.eval(), discriminator.eval(), {**history, "resumed_after_epoch": start or None,
                                                    "seconds_before": seconds_before}


def sample_images(train_set, seed: int, count: int = 8) -> torch.Tensor:
    """`count` training images drawn with the seed, for the sample grids."""
    picks = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.stack([train_set[i][0] for i in picks])


def sample_grid(images: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Rows: originals | generated | 0.5 + 10 x (generated - original), the difference made visible."""
    difference = (0.5 + 10 * (generated - images)).clamp(0, 1)
    return make_grid(torch.cat([images, generated, difference]).cpu(), nrow=len(images), padding=2, pad_value=1)


def plot_losses(history: dict, path: Path) -> None:
    """The generator's loss terms and the discriminator's loss per step (matplotlib, written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    names = [n for n in ("g_loss", "mse", "lpips", "hash", "gan_g") if any(history.get(n, []))]  # lpips 0: left out
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3))
    for axis, name in zip(axes, names):
        axis.plot(history[name], linewidth=0.8)
        axis.set_title(name)
        axis.set_xlabel("step")
    axes[-1].plot(history["d_steps"], history["d_loss"], linewidth=0.8)
    axes[-1].set_title("d_loss")
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    cli_entry(main)
