"""Defenses against a run's backdoored model (the CIBA paper's appendix), adapted to deep hashing.

    python defend.py --run checkpoint/demo --backdoor ciba-t3-s4__confusing-t3-m60-e8-l0.8-b20-s20-seed0 \\
        --defense fine-pruning

fine-pruning (Liu et al., RAID 2018). The defender holds --clean-images labelled clean images: drawn with --seed
among the database images that are not in the training list, so none of them is poisoned. It ranks the channels of
the backbone's last feature map (the last layer of the backbone whose output is a C x H x W map) by their mean
activation on those images and masks the most dormant ones. For every fraction of --prune-fractions the pruned model,
untrained, gives a point of the pruning curve: MAP of the clean queries and t-MAP of the triggered non-target
queries (evaluate.py's definitions, @--topk). Then the model pruned at --prune-fraction is fine-tuned for
--fine-tune-epochs on the defender's images with the clean run's loss, optimiser, learning rates, batch size and
augmentation, the pruned channels held at 0, and evaluated the same way.

Writes RUN/defense/fine-pruning__<backdoor>/: curve.json (the curve; reused when its settings and the backdoored
checkpoint are the same), curve.csv and curve.png, results.json (curve, fine-tuned MAP and t-MAP, channel ranking,
settings, seeds, provenance), and the fine-tuning's config.json, checkpoint.pt (--resume continues it), history.json
and codes.pt. Anti-backdoor learning and the differential-privacy detection are not implemented yet.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

import evaluate
import figures
from data import make_loader, open_run_split
from models import build_loss
from models.hashnet import load_checkpoint, load_stage, read_clean
from models.training import fit
from retrieval import CONVENTIONS, encode, mean_average_precision, saved_codes, targeted_map
from runs import (UserError, add_deterministic_flag, cli_entry, make_deterministic, pick_device,
                  pick_output, provenance, read_json, require_at_least_one, write_json)
from train_backdoor import clean_recipe

RUN = "checkpoint/demo"
BACKDOOR = None  # folder name under RUN/backdoor/ (step 5); None: the only one there
DEFENSE = "fine-pruning"
CLEAN_IMAGES = 500  # labelled clean images the defender holds (database images outside the training list)
PRUNE_FRACTIONS = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]  # the pruning curve
PRUNE_FRACTION = 0.8  # the fraction pruned before fine-tuning
FINE_TUNE_EPOCHS = 10
TOPK = 1000
CONVENTION = "empty-zero"
SEED = 0  # the defender's images
BATCH_SIZE = 256  # encoding
WORKERS = 4
DEVICE = "auto"
RESUME = False
OVERWRITE = False

DEFENSES = ("fine-pruning",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--backdoor", default=BACKDOOR)
    p.add_argument("--defense", default=DEFENSE, choices=DEFENSES)
    p.add_argument("--clean-images", type=int, default=CLEAN_IMAGES)
    p.add_argument("--prune-fractions", type=float, nargs="+", default=PRUNE_FRACTIONS)
    p.add_argument("--prune-fraction", type=float, default=PRUNE_FRACTION)
    p.add_argument("--fine-tune-epochs", type=int, default=FINE_TUNE_EPOCHS)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--resume", default=RESUME, action="store_true")
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    args = p.parse_args(argv)
    require_at_least_one(args, "clean_images", "fine_tune_epochs", "topk", "batch_size")
    for fraction in (*args.prune_fractions, args.prune_fraction):
        if not 0 <= fraction <= 1:
            raise UserError(f"pruning fraction {fraction:g} is outside [0, 1]; it is the share of the last feature "
                            f"map's channels that is masked (--prune-fraction, --prune-fractions)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    device = pick_device(args.device)
    run = Path(args.run)
    clean, clean_id = read_clean(run)
    backdoor_dir = pick_output(run / "backdoor", args.backdoor, "codes.pt", "train_backdoor.py", "--backdoor")
    config, ckpt, model = load_stage(run, f"backdoor/{backdoor_dir.name}", device, made_by="train_backdoor.py")
    evaluate.check_same_model(config, clean, clean_id, backdoor_dir, run)
    trigger = evaluate.load_trigger(run / "triggers" / config["trigger"], clean_id)
    out = run / "defense" / f"{args.defense}__{backdoor_dir.name}"
    held = defender_images(clean, args.clean_images, args.seed)
    query_set = open_run_split(clean, "query")
    database_set = open_run_split(clean, "database")

    t0 = time.time()
    layer_name, mask = insert_channel_mask(model, clean["image_size"], device)
    activation = mean_channel_activation(model, mask, Subset(database_set, held), args, device)
    order = torch.argsort(activation, stable=True)  # most dormant first
    settings = {"clean_images": args.clean_images, "seed": args.seed, "prune_fractions": args.prune_fractions,
                "topk": args.topk, "convention": args.convention, "backdoor_checkpoint_id": ckpt["checkpoint_id"]}
    curve_path = out / "curve.json"
    curve = read_json(curve_path) if curve_path.is_file() and not args.overwrite else None
    if curve is None or curve["settings"] != settings:
        points = []
        for fraction in args.prune_fractions:
            set_pruned(mask, order, fraction)
            points.append({"fraction": fraction, "pruned": int((mask.mask == 0).sum()),
                           **retrieval_scores(model, query_set, database_set, trigger, run, args, device)})
            print(f"pruned {fraction:.0%} of {layer_name} ({points[-1]['pruned']} channels): MAP "
                  f"{points[-1]['map']:.4f}, t-MAP {points[-1]['t_map']:.4f}", flush=True)
        curve = {"settings": settings, "points": points}
        write_json(curve, curve_path)
    curve_seconds = time.time() - t0
    write_curve(curve["points"], backdoor_dir.name, out)

    set_pruned(mask, order, args.prune_fraction)
    recipe = clean_recipe(clean, workers=args.workers, eval_every=0, amp="auto", cache="off", channels_last="auto")
    recipe.epochs = args.fine_tune_epochs
    train_set = Subset(open_run_split(clean, "database", clean["augment"]), held)
    fine_tune = {**vars(recipe), "data": clean["data"], "stage": f"defense/{out.name}", "defense": args.defense,
                 "backdoor": backdoor_dir.name, "backdoor_checkpoint_id": ckpt["checkpoint_id"],
                 "layer": layer_name, "prune_fraction": args.prune_fraction, "pruned": int((mask.mask == 0).sum()),
                 "clean_images": args.clean_images, "defender_seed": args.seed,
                 "clean_checkpoint_id": clean_id, "provenance": provenance(device)}
    loss_fn = build_loss(recipe.loss, recipe.bits, recipe.n_classes, recipe.pairwise_norm, recipe.quant_weight)
    torch.manual_seed(args.seed)
    trained = fit(model, loss_fn.to(device), recipe, train_set, query_set, database_set, out, fine_tune, device,
                  args.resume, args.overwrite)
    # a finished fine-tuning is reused without loading its weights into the model: take them from its checkpoint
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt", device)["model"])
    saved = saved_codes(out / "codes.pt", trained["checkpoint_id"])  # fit encoded the database with these weights
    tuned = retrieval_scores(model, query_set, database_set, trigger, run, args, device,
                             (saved["database_codes"], saved["database_labels"]))
    before = next((p for p in curve["points"] if p["fraction"] == 0), None)
    result = {"defense": args.defense, "backdoor": backdoor_dir.name,
              "method": figures.method_of(run, config["trigger"], config["perturbations"]),
              "target": trigger["target"], "layer": layer_name, "channels": int(mask.mask.numel()),
              "dormant_order": order.tolist(), "curve": curve["points"], "prune_fraction": args.prune_fraction,
              "fine_tune_epochs": args.fine_tune_epochs, "defended": tuned, "undefended": before,
              "clean_map": read_json(backdoor_dir / "results.json")["clean_map"]
              if (backdoor_dir / "results.json").is_file() else None,
              "settings": {k: v for k, v in vars(args).items()}, "curve_seconds": round(curve_seconds, 2),
              "provenance": provenance(device)}
    write_json(result, out / "results.json")
    print(f"fine-pruning of {backdoor_dir.name}: pruned {args.prune_fraction:.0%} of {layer_name} and fine-tuned "
          f"{args.fine_tune_epochs} epoch(s) on {args.clean_images} clean images: MAP {tuned['map']:.4f}, t-MAP "
          f"{tuned['t_map']:.4f} -> {out / 'results.json'}")
    return result


def defender_images(clean: dict, count: int, seed: int) -> list[int]:
    """Indices into the database split of `count` images drawn with the seed among those not in the training list."""
    database = open_run_split(clean, "database").image_list
    training = set(open_run_split(clean, "train").image_list.paths)
    candidates = [i for i, path in enumerate(database.paths) if path not in training]
    if len(candidates) < count:
        raise UserError(f"{database.list_file} has {len(candidates)} images outside the training list; "
                        f"--clean-images {count} needs at least that many")
    return sorted(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())


class ChannelMask(nn.Module):
    """Multiplies channel c of a B x C x H x W map by mask[c] (1 kept, 0 pruned); the mask is a buffer."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(channels))
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recorded is not None:
            self.recorded.append(x.detach().mean((0, 2, 3)) * x.shape[0])
        return x * self.mask.view(1, -1, 1, 1).to(x.dtype)


def insert_channel_mask(model: nn.Module, image_size: int, device: torch.device) -> tuple[str, ChannelMask]:
    """Put a ChannelMask after the last leaf layer of model.features (not an identity or dropout) whose output is a
    4-D map; its name and the mask."""
    outputs: list[tuple[str, torch.Size]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: outputs.append((name, o.shape)))
             for name, module in model.features.named_modules()
             if not list(module.children()) and not isinstance(module, (nn.Identity, nn.Dropout))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    for hook in hooks:
        hook.remove()
    maps = [(name, shape) for name, shape in outputs if len(shape) == 4]
    if not maps:
        raise UserError(f"the {model.arch} backbone has no layer with a C x H x W output to prune")
    name, shape = maps[-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.features.get_submodule(parent_name) if parent_name else model.features
    mask = ChannelMask(shape[1]).to(device)
    setattr(parent, child, nn.Sequential(getattr(parent, child), mask))
    return f"features.{name}", mask


@torch.no_grad()
def mean_channel_activation(model: nn.Module, mask: ChannelMask, images, args: argparse.Namespace,
                            device: torch.device) -> torch.Tensor:
    """Mean activation of every channel at the mask (before masking) over the images (Fine-Pruning's ranking)."""
    mask.recorded = []
    try:
        encode(model, make_loader(images, args.batch_size, args.workers), device, "rank channels", progress=False)
        return torch.stack(mask.recorded).sum(0).cpu() / len(images)
    finally:
        mask.recorded = None


def set_pruned(mask: ChannelMask, order: torch.Tensor, fraction: float) -> None:
    """Mask the round(fraction * C) most dormant channels, keep the rest."""
    mask.mask.fill_(1)
    mask.mask[order[:round(fraction * len(order))].to(mask.mask.device)] = 0


def retrieval_scores(model: nn.Module, query_set, database_set, trigger: dict, run: Path, args: argparse.Namespace,
                     device: torch.device, database: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """MAP of the clean queries and t-MAP of the triggered non-target queries, @topk, under the model as it is;
    `database`: (codes, labels) already encoded with these weights."""
    model.eval()
    queries, query_labels = encode(model, make_loader(query_set, args.batch_size, args.workers), device,
                                   "encode query", progress=False)
    db_codes, db_labels = database or encode(model, make_loader(database_set, args.batch_size, args.workers), device,
                                             "encode database", progress=False)
    _, triggered = evaluate.triggered_codes(model, query_set, query_labels, trigger, run, args, device)
    clean = mean_average_precision(queries.to(device), query_labels, db_codes, db_labels, args.topk, args.convention)
    attacked = targeted_map(triggered, trigger["target"], db_codes, db_labels, args.topk, args.convention)
    return {"map": clean["map"], "t_map": attacked["map"]}


def write_curve(points: list[dict], backdoor: str, out: Path) -> None:
    """curve.png and curve.csv: MAP and t-MAP (%) against the pruned fraction, before fine-tuning."""
    figure, axes = figures.new_figure()
    fractions = [p["fraction"] for p in points]
    axes.plot(fractions, [100 * p["map"] for p in points], "o-", label="MAP (clean queries)")
    axes.plot(fractions, [100 * p["t_map"] for p in points], "s-", label="t-MAP (triggered queries)")
    axes.set_xticks(fractions)
    axes.set(xlabel="fraction of the last feature map's channels pruned", ylabel="%", ylim=(0, 100))
    axes.set_title(f"fine-pruning, before fine-tuning: {backdoor}", fontsize=7)
    axes.legend(fontsize=7)
    figures.save(figure, [["fraction", "pruned", "map", "t_map"]] +
                 [[p["fraction"], p["pruned"], p["map"], p["t_map"]] for p in points], out / "curve")


if __name__ == "__main__":
    cli_entry(main)
