"""Anti-backdoor learning (Li et al., NeurIPS 2021) for a hashing model trained on a run's poisoned list.

ABL trains the model itself, on the poisoned data, in four stages (each a fit() of models/training.py in its own
folder, so each resumes and is reused on its own):

1. isolation: --isolation-epochs of the clean recipe from the victim's starting weights, with the local gradient
   ascent of ABL's Eq. 3, L = mean_i sign(l_i - gamma) l_i: an image whose loss falls below gamma is pushed back up;
2. the per-image loss of every training image (un-augmented) under that model; the --isolation-ratio with the lowest
   loss are isolated (backdoor images are learned fastest, ABL's premise), over the whole list (ABL's) or, with
   --isolation-scope per-class, within each class;
3. training continues on the other images with the clean loss for --abl-epochs (default: the clean recipe's epochs
   less the isolation epochs, so ABL trains as long as the victim);
4. unlearning: --unlearn-epochs of gradient ascent, L = -mean_i l_i, on the isolated images alone (the official
   code's unlearning stage).

The per-image loss l_i of the pairwise hashing objectives is image i's row of the loss's pair matrix averaged over
the batch, plus its own quantisation term (models/losses.py, reduction="none"); the mean of the l_i is the training
loss. In stage 2 the "batch" is the whole training list, so l_i is image i's mean term against every training image
(N x N pairs). In stage 4 the pairs are those among the isolated images: their ascent pushes apart images that the
model gave one code, which undoes whatever they share, the trigger among it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import HashListDataset, make_loader
from data.lists import ImageList
from defenses.common import (Victim, detection_quality, per_image_losses, poisoned_training, retrieval_scores,
                             undefended_scores, victim_recipe)
from models import build_loss, build_model
from models.hash_network import load_checkpoint
from models.training import fit
from retrieval import saved_codes
from runs import UserError, provenance, read_json, write_json

STAGES = ("isolation", "training", "unlearning")


class LocalGradientAscent(nn.Module):
    """ABL's Eq. 3 on per-image losses: mean_i sign(l_i - gamma) * l_i (descent above gamma, ascent below)."""

    def __init__(self, loss: nn.Module, gamma: float):
        super().__init__()
        self.loss, self.gamma = loss, gamma

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        terms = self.loss(u, y, reduction="none")
        return (torch.sign(terms - self.gamma) * terms).mean()


class GradientAscent(nn.Module):
    """-loss: the unlearning objective of ABL's last stage on the isolated images."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.loss(u, y)


def anti_backdoor_learning(victim: Victim, args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """The four stages on the victim's poisoned list; isolation.json (per-image losses, the isolated images, their
    precision, recall and AUROC for the poisoned images) and results.json (MAP and t-MAP before and after
    unlearning, beside the undefended victim's)."""
    train_set, plain, poisoned = poisoned_training(victim, "ABL")
    recipe = victim_recipe(victim, args.workers)
    abl_epochs = recipe.epochs - args.isolation_epochs if args.abl_epochs is None else args.abl_epochs
    if abl_epochs < 1:
        raise UserError(f"--abl-epochs: the clean recipe trains {recipe.epochs} epochs and --isolation-epochs "
                        f"{args.isolation_epochs} leaves none; give --abl-epochs or fewer isolation epochs")
    abl = {"gamma": args.gamma, "isolation_epochs": args.isolation_epochs, "isolation_ratio": args.isolation_ratio,
           "isolation_scope": args.isolation_scope, "abl_epochs": abl_epochs, "unlearn_epochs": args.unlearn_epochs}
    config = victim.config
    common = {"data": victim.clean["data"], "defense": args.defense, "backdoor": victim.backdoor_dir.name,
              "backdoor_checkpoint_id": victim.checkpoint_id, "poisoned": config["poisoned"],
              "poisoned_id": config["poisoned_id"], "augment_poison": config["augment_poison"],
              "clean_checkpoint_id": victim.clean_id, "provenance": provenance(device)}
    base = build_loss(recipe.loss, recipe.bits, recipe.n_classes, recipe.pairwise_norm, recipe.quant_weight)
    undefended = undefended_scores(victim, args, device)

    torch.manual_seed(recipe.seed)  # the victim's starting weights (train_backdoor.py seeds the same way)
    model = build_model(recipe.arch, recipe.bits, recipe.pretrained, recipe.head, recipe.image_size).to(device)
    # each stage records (and on --resume checks) the ABL settings that shaped it
    isolation = train_stage(model, LocalGradientAscent(base, args.gamma), recipe, args.isolation_epochs, train_set,
                            victim, out / "isolation", {**common, "abl": stage_settings(abl, "isolation")}, args,
                            device)
    isolated = isolate(model, base, plain, poisoned, isolation["checkpoint_id"], abl, out / "isolation.json", args,
                       device)
    keep = sorted(set(range(len(train_set))) - set(isolated["isolated"]))
    trained = train_stage(model, base, recipe, abl_epochs, sub_list(train_set, keep), victim, out / "training",
                          {**common, "abl": stage_settings(abl, "training"), "isolated": isolated["isolated"]}, args,
                          device)
    before = stage_scores(model, trained, victim, args, device)
    unlearned = train_stage(model, GradientAscent(base), recipe, args.unlearn_epochs,
                            sub_list(train_set, isolated["isolated"]), victim, out / "unlearning",
                            {**common, "abl": abl, "isolated": isolated["isolated"]}, args, device)
    after = stage_scores(model, unlearned, victim, args, device)
    result = {"defense": args.defense, "backdoor": victim.backdoor_dir.name, "method": victim.method,
              "target": victim.trigger["target"], "poisoned": len(poisoned), "train_images": len(train_set),
              **{k: isolated[k] for k in ("isolated_count", "precision", "recall", "auroc", "poisoned_isolated")},
              "undefended": undefended, "before_unlearning": before, "defended": after,
              "clean_map": victim.clean_map, "abl": abl, "settings": vars(args), "provenance": provenance(device)}
    write_json(result, out / "results.json")
    print(f"ABL of {victim.backdoor_dir.name}: isolated {isolated['isolated_count']} images, "
          f"{isolated['poisoned_isolated']} of {len(poisoned)} poisoned (precision {isolated['precision']:.3f}, "
          f"recall {isolated['recall']:.3f}, AUROC {isolated['auroc']:.3f}); MAP {undefended['map']:.4f} -> "
          f"{after['map']:.4f}, t-MAP {undefended['t_map']:.4f} -> {after['t_map']:.4f} (before unlearning "
          f"{before['map']:.4f} / {before['t_map']:.4f}) -> {out / 'results.json'}")
    return result


def stage_settings(abl: dict, stage: str) -> dict:
    """The ABL settings a stage depends on: the isolation's, then the isolation ratio and the training's epochs."""
    keys = ("gamma", "isolation_epochs") + (("isolation_ratio", "isolation_scope", "abl_epochs")
                                            if stage == "training" else ())
    return {key: abl[key] for key in keys} if stage != "unlearning" else abl


def train_stage(model: nn.Module, loss_fn: nn.Module, recipe: argparse.Namespace, epochs: int, train_set,
                victim: Victim, out: Path, common: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """fit() one stage into `out` from the model's current weights, then load the stage's final weights (a
    finished stage is reused without loading them). --resume refuses a stage made with other ABL settings."""
    stage_recipe = argparse.Namespace(**{**vars(recipe), "epochs": epochs})
    config = {**vars(stage_recipe), **common, "stage": f"defense/{out.parent.name}/{out.name}"}
    saved_config = out / "config.json"
    if args.resume and saved_config.is_file() and (saved := read_json(saved_config)) and not args.overwrite:
        diffs = [f"{key}: {saved.get(key)!r} there, {config[key]!r} here" for key in ("abl", "isolated")
                 if key in config and saved.get(key) != config[key]]
        if diffs:
            raise UserError(f"cannot resume {out}: it was made with other ABL settings ({'; '.join(diffs)}); use "
                            f"the same settings or --overwrite")
    trained = fit(model, loss_fn.to(device), stage_recipe, train_set, victim.query_set, victim.database_set, out,
                  config, device, args.resume, args.overwrite)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt", device)["model"])
    return trained


def isolate(model: nn.Module, loss: nn.Module, plain: HashListDataset, poisoned: list[int], checkpoint_id: str,
            abl: dict, path: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """Stage 2: the per-image loss of every training image (`plain`: un-augmented) against all of them, the lowest
    --isolation-ratio isolated (`isolated_indices`); precision and recall of the isolated set for the poisoned
    images and the AUROC of the loss as a detector (lower loss = poisoned). Reused from `path` for the same
    isolation model and settings."""
    if path.is_file() and not args.overwrite:
        saved = read_json(path)
        if saved["isolation_checkpoint_id"] == checkpoint_id and all(
                saved.get(key) == abl[key] for key in ("isolation_ratio", "isolation_scope")):
            return saved
    terms = per_image_losses(model, loss, make_loader(plain, args.batch_size, args.workers), device)
    isolated = isolated_indices(terms, plain.image_list.labels, abl["isolation_ratio"], abl["isolation_scope"])
    count = len(isolated)
    hits = len(set(isolated) & set(poisoned))
    quality = detection_quality(-terms, poisoned)  # a low loss marks a poisoned image
    result = {"isolation_checkpoint_id": checkpoint_id, "isolation_ratio": abl["isolation_ratio"],
              "isolation_scope": abl["isolation_scope"], "isolated_count": count, "isolated": isolated,
              "poisoned_isolated": hits,
              "precision": hits / count, "recall": hits / max(len(poisoned), 1), "auroc": quality["auroc"],
              "mean_loss_poisoned": -quality["mean_score_poisoned"] if poisoned else None,
              "mean_loss_other": -quality["mean_score_other"], "losses": terms.tolist()}
    write_json(result, path)
    return result


def isolated_indices(terms: torch.Tensor, labels: np.ndarray, ratio: float, scope: str) -> list[int]:
    """The images ABL isolates, sorted: the `ratio` with the lowest per-image loss over the whole list ("global",
    ABL's; at least one), or within each class ("per-class"; at least one per class, a multi-label image counted in
    each of its classes), so that one class whose images all fit easily cannot fill the whole quota."""
    if scope == "global":
        return sorted(torch.argsort(terms, stable=True)[:max(1, round(ratio * len(terms)))].tolist())
    if scope != "per-class":
        raise ValueError(f"isolation scope {scope!r} is neither 'global' nor 'per-class'")
    chosen: set[int] = set()
    for members in (torch.as_tensor(np.flatnonzero(column)) for column in labels.T):
        if len(members):
            lowest = torch.argsort(terms[members], stable=True)[:max(1, round(ratio * len(members)))]
            chosen.update(members[lowest].tolist())
    return sorted(chosen)


def sub_list(dataset: HashListDataset, indices: list[int]) -> HashListDataset:
    """The entries `indices` of a list dataset as a list dataset of their own (its plain, un-augmented entries
    kept plain), so that fit() can cache it."""
    image_list = dataset.image_list
    part = ImageList(image_list.list_file, [image_list.paths[i] for i in indices], image_list.labels[indices],
                     [image_list.line_numbers[i] for i in indices])
    plain = [k for k, i in enumerate(indices) if i in dataset.plain_indices]
    return HashListDataset(part, dataset.transform, plain_indices=plain, plain_transform=dataset.plain_transform)


def stage_scores(model: nn.Module, trained: dict, victim: Victim, args: argparse.Namespace,
                 device: torch.device) -> dict:
    """MAP and t-MAP of the model after a stage, with the database codes its fit() encoded."""
    saved = saved_codes(Path(trained["out"]) / "codes.pt", trained["checkpoint_id"])
    return retrieval_scores(model, victim, args, device, (saved["database_codes"], saved["database_labels"]))
