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
badhash  BadHash's conditional generator (docs/method.md; triggers/badhash.py), trained once per run against the
         clean model and shared by every target: LabCLN first (pairs of smoothed and plain label vectors, NT-Xent +
         MSE + quantisation), then generator and discriminator on the training images, each image with a confusing
         label drawn at random from the training set's label vectors (not always the first one, as in the public
         code). Generator loss W_REC * (MSE + LPIPS_WEIGHT * LPIPS) + W_HASH * (1 - mean(F'(G(x)) sign(h_l))) + W_GAN
         * least-squares GAN loss; the discriminator predicts (labels, real/fake) and is updated every D_EVERY-th
         step. The last epoch's generator is kept (no model selection on test data). The trigger of a target is the
         generator with the target's LabCLN feature. An interrupted training continues from its last finished epoch
         when the same command is run again (--overwrite starts it over).

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
import time
from pathlib import Path
from typing import Iterator, Sized

import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from data import HashListDataset, open_run_split
from data.cache import CACHE_MODES, cache_bytes, decode, resolve_cache, uint8_sources
from data.images import save_png
from data.protocols import choose_class
from models.hash_network import binarize, fold_batch_norms, load_stage
from retrieval import anchor_code
from runs import (UserError, add_deterministic_flag, atomic_save, claim, cli_entry, load_saved,
                  make_deterministic, pick_device, provenance, read_json, require_at_least_one, write_json,
                  write_timing)
from triggers import apply_trigger, check_trigger_size, default_trigger_size, quantize, trigger_transform
from triggers.badhash import badhash_net_name, badhash_trigger
from triggers.iab import IAB_KEYS, iab_trigger
from triggers.preview import sample_grid, sample_images
from triggers.reflection import reflection_images
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with a trained clean model (step 1)
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
IAB_BATCH = 32  # iab: images per step
IAB_LR = 1e-3  # Adam
IAB_WIDTH = 32  # channels of the networks' first block
MASK_DENSITY = 0.032  # iab: IAB's target share of the image under the mask
W_DIV = 1.0  # iab: IAB's lambda_div
W_MASK = 100.0  # iab: weight of IAB's mask norm
# badhash (public code's values)
LABCLN_STEPS = 1000  # badhash: LabCLN training steps
LABCLN_BATCH = 128  # badhash: label pairs per LabCLN step
GEN_EPOCHS = 100  # constant learning rate for the first half, linear decay to 0 over the second (public code: 50 + 50)
GEN_BATCH = 64  # badhash: images per generator step
GEN_LR = 1e-4  # Adam, betas (0.5, 0.999), generator, discriminator and LabCLN
GEN_WIDTH = 64  # channels of the generator's and discriminator's first layer
W_REC = 200.0  # badhash: weight of the reconstruction term
LPIPS_WEIGHT = 1.0  # weight of LPIPS inside the reconstruction term; 0 trains without it (no AlexNet weights needed)
W_HASH = None  # None: 5 for vgg11, 10 for the other backbones (public code: 5 with VGG-11, 10 with ResNet-50)
W_GAN = 1.0  # badhash: weight of the GAN term
D_EVERY = 3  # the discriminator is updated on every D_EVERY-th generator step
FOLD_BN = False  # ciba: optimise against the clean model with batch norms folded (faster; docs/performance.md)
CACHE = "auto"  # ciba: decode the drawn training images once ("auto": on the GPU if they fit, else host memory)
SEED = 0  # trigger batches, blend pattern, reflections, networks
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OVERWRITE = False  # make the trigger again even if it exists

METHODS = ("ciba", "badnets", "blend", "reflection", "iab", "badhash")
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
    p.add_argument("--fold-bn", default=FOLD_BN, action=argparse.BooleanOptionalAction)
    p.add_argument("--cache", default=CACHE, choices=("auto", *CACHE_MODES))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
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
    check_step_size(args.step_size)
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


def checkerboard(trigger_size: int) -> torch.Tensor:
    """BadNets-style static patch: black and white cells of max(1, s // 4) px, white in the top-left cell."""
    cell = max(1, trigger_size // 4)
    idx = torch.arange(trigger_size) // cell
    board = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 == 0).float()
    return board.expand(3, -1, -1).clone()


def check_step_size(step_size: float, flag: str = "--step-size") -> None:
    """Eq. 7's step must move the patch: a positive number of pixel units (of 255)."""
    if step_size <= 0:
        raise UserError(f"{flag} must be positive (pixel units of 255), got {step_size}")


if __name__ == "__main__":
    cli_entry(main)
