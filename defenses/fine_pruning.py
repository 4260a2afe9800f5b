"""Fine-pruning (Liu et al., RAID 2018) of a backdoored hashing model: mask the channels of the backbone's last
feature map that stay most dormant on the defender's clean images, then fine-tune on those images."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import figures
from data import make_loader, open_run_split
from defenses.common import Victim, defender_images, retrieval_scores, undefended_scores
from models import build_loss
from models.hash_network import load_checkpoint
from models.training import fit
from retrieval import encode, saved_codes
from runs import UserError, provenance, read_json, write_json
from train_backdoor import clean_recipe


def fine_pruning(victim: Victim, args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """The pruning curve (MAP, t-MAP for each of --prune-fractions, untrained; curve.json, reused when its settings
    and the backdoored checkpoint are the same), then the model pruned at --prune-fraction fine-tuned with the clean
    recipe on the defender's images, the pruned channels held at 0; results.json."""
    model, clean = victim.model, victim.clean
    held = defender_images(clean, args.clean_images, args.seed)
    t0 = time.time()
    layer_name, mask = insert_channel_mask(model, clean["image_size"], device)
    activation = mean_channel_activation(model, mask, Subset(victim.database_set, held), args, device)
    order = torch.argsort(activation, stable=True)  # most dormant first
    settings = {"clean_images": args.clean_images, "seed": args.seed, "prune_fractions": args.prune_fractions,
                "topk": args.topk, "convention": args.convention, "backdoor_checkpoint_id": victim.checkpoint_id}
    curve_path = out / "curve.json"
    curve = read_json(curve_path) if curve_path.is_file() and not args.overwrite else None
    if curve is None or curve["settings"] != settings:
        points = []
        for fraction in args.prune_fractions:
            set_pruned(mask, order, fraction)
            points.append({"fraction": fraction, "pruned": int((mask.mask == 0).sum()),
                           **retrieval_scores(model, victim, args, device)})
            print(f"pruned {fraction:.0%} of {layer_name} ({points[-1]['pruned']} channels): MAP "
                  f"{points[-1]['map']:.4f}, t-MAP {points[-1]['t_map']:.4f}", flush=True)
        curve = {"settings": settings, "points": points}
        write_json(curve, curve_path)
    curve_seconds = time.time() - t0
    write_curve(curve["points"], victim.backdoor_dir.name, out)

    set_pruned(mask, order, args.prune_fraction)
    recipe = clean_recipe(clean, workers=args.workers, eval_every=0, amp="auto", cache="off", channels_last="auto")
    recipe.epochs = args.fine_tune_epochs
    train_set = Subset(open_run_split(clean, "database", clean["augment"]), held)
    fine_tune = {**vars(recipe), "data": clean["data"], "stage": f"defense/{out.name}", "defense": args.defense,
                 "backdoor": victim.backdoor_dir.name, "backdoor_checkpoint_id": victim.checkpoint_id,
                 "layer": layer_name, "prune_fraction": args.prune_fraction, "pruned": int((mask.mask == 0).sum()),
                 "clean_images": args.clean_images, "defender_seed": args.seed,
                 "clean_checkpoint_id": victim.clean_id, "provenance": provenance(device)}
    loss_fn = build_loss(recipe.loss, recipe.bits, recipe.n_classes, recipe.pairwise_norm, recipe.quant_weight)
    torch.manual_seed(args.seed)
    trained = fit(model, loss_fn.to(device), recipe, train_set, victim.query_set, victim.database_set, out,
                  fine_tune, device, args.resume, args.overwrite)
    # a finished fine-tuning is reused without loading its weights into the model: take them from its checkpoint
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt", device)["model"])
    saved = saved_codes(out / "codes.pt", trained["checkpoint_id"])  # fit encoded the database with these weights
    tuned = retrieval_scores(model, victim, args, device, (saved["database_codes"], saved["database_labels"]))
    before = (next((p for p in curve["points"] if p["fraction"] == 0), None)
              or undefended_scores(victim, args, device))
    result = {"defense": args.defense, "backdoor": victim.backdoor_dir.name, "method": victim.method,
              "target": victim.trigger["target"], "layer": layer_name, "channels": int(mask.mask.numel()),
              "dormant_order": order.tolist(), "curve": curve["points"], "prune_fraction": args.prune_fraction,
              "fine_tune_epochs": args.fine_tune_epochs, "defended": tuned, "undefended": before,
              "clean_map": victim.clean_map, "settings": vars(args), "curve_seconds": round(curve_seconds, 2),
              "provenance": provenance(device)}
    write_json(result, out / "results.json")
    print(f"fine-pruning of {victim.backdoor_dir.name}: pruned {args.prune_fraction:.0%} of {layer_name} and "
          f"fine-tuned {args.fine_tune_epochs} epoch(s) on {args.clean_images} clean images: MAP {tuned['map']:.4f}, "
          f"t-MAP {tuned['t_map']:.4f} -> {out / 'results.json'}")
    return result


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
