"""What every defense reads and reports: the attacked run (its backdoored model, trigger and splits), the clean
images a defender holds, and MAP / t-MAP under a model as it is."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import evaluate
import figures
from data import HashListDataset, image_transform, make_loader, open_run_split
from models.hash_network import load_stage, read_clean
from retrieval import encode, mean_average_precision, saved_codes, targeted_map
from runs import UserError, pick_output, read_json
from train_backdoor import batch_source, clean_recipe, poisoned_fingerprint, poisoned_train_set


@dataclass
class Victim:
    """A run's backdoored model (step 5) with what a defense of it needs."""

    run: Path
    clean: dict  # RUN/clean/config.json
    clean_id: str
    backdoor_dir: Path
    config: dict  # the backdoored training's config.json
    checkpoint_id: str
    model: nn.Module
    trigger: dict
    query_set: object
    database_set: object

    @property
    def method(self) -> str:
        return figures.method_of(self.run, self.config["trigger"], self.config["perturbations"])

    @property
    def clean_map(self) -> float | None:
        """The clean model's MAP as evaluate.py wrote it, beside the backdoored model's or for the clean model alone
        (None: not evaluated yet)."""
        for path, key in ((self.backdoor_dir / "results.json", "clean_map"), (self.run / "clean" / "results.json",
                                                                              "map")):
            if path.is_file():
                return read_json(path)[key]
        return None


def load_victim(run: Path, backdoor: str | None, device: torch.device) -> Victim:
    """The backdoored model RUN/backdoor/BACKDOOR (the only one there when None), checked against the clean run."""
    clean, clean_id = read_clean(run)
    backdoor_dir = pick_output(run / "backdoor", backdoor, "codes.pt", "train_backdoor.py", "--backdoor")
    config, ckpt, model = load_stage(run, f"backdoor/{backdoor_dir.name}", device, made_by="train_backdoor.py")
    evaluate.check_same_model(config, clean, clean_id, backdoor_dir, run)
    trigger = evaluate.load_trigger(run / "triggers" / config["trigger"], clean_id)
    return Victim(run, clean, clean_id, backdoor_dir, config, ckpt["checkpoint_id"], model, trigger,
                  open_run_split(clean, "query"), open_run_split(clean, "database"))


def defender_images(clean: dict, count: int, seed: int) -> list[int]:
    """Indices into the database split of `count` images drawn with the seed among those not in the training list."""
    database = open_run_split(clean, "database").image_list
    training = set(open_run_split(clean, "train").image_list.paths)
    candidates = [i for i, path in enumerate(database.paths) if path not in training]
    if len(candidates) < count:
        raise UserError(f"{database.list_file} has {len(candidates)} images outside the training list; "
                        f"--clean-images {count} needs at least that many")
    return sorted(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())


def retrieval_scores(model: nn.Module, victim: Victim, args: argparse.Namespace, device: torch.device,
                     database: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """MAP of the clean queries and t-MAP of the triggered non-target queries, @topk (evaluate.py's definitions),
    under the model as it is; `database`: (codes, labels) already encoded with these weights."""
    model.eval()
    queries, query_labels = encode(model, make_loader(victim.query_set, args.batch_size, args.workers), device,
                                   "encode query", progress=False)
    db_codes, db_labels = database or encode(model, make_loader(victim.database_set, args.batch_size, args.workers),
                                             device, "encode database", progress=False)
    _, triggered = evaluate.triggered_codes(model, victim.query_set, query_labels, victim.trigger, victim.run, args,
                                            device)
    clean = mean_average_precision(queries.to(device), query_labels, db_codes, db_labels, args.topk, args.convention)
    attacked = targeted_map(triggered, victim.trigger["target"], db_codes, db_labels, args.topk, args.convention)
    return {"map": clean["map"], "t_map": attacked["map"]}


@torch.no_grad()
def per_image_losses(model: nn.Module, loss: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """l_i of every image in the loader against all of them: the relaxed codes of all images as one batch."""
    model.eval()
    codes, labels = [], []
    for images, y, _ in loader:
        codes.append(model(images.to(device)).float())
        labels.append(y.to(device))
    return loss(torch.cat(codes), torch.cat(labels), reduction="none").cpu()


def poisoned_training(victim: Victim, defense: str) -> tuple[HashListDataset, HashListDataset, list[int]]:
    """The victim's poisoned training list as it trained on it (the poisoned entries augmented or not, as the victim
    had them), the same list un-augmented, and the indices of the poisoned entries: what a training-time defense
    trains on."""
    config = victim.config
    poisoned_dir = victim.run / "poisoned" / config["poisoned"]
    if not (poisoned_dir / "manifest.json").is_file():
        raise UserError(f"{poisoned_dir} (the poisoned list {victim.backdoor_dir.name} was trained on) is missing; "
                        f"make it again with poison_dataset.py")
    if poisoned_fingerprint(poisoned_dir) != config.get("poisoned_id"):
        raise UserError(f"{poisoned_dir} was made again after {victim.backdoor_dir} was trained on it, so {defense} "
                        f"would train on other data than the victim; train the victim again (train_backdoor.py "
                        f"--overwrite) first")
    poisoned = [entry["index"] for entry in read_json(poisoned_dir / "manifest.json")]
    train_set = poisoned_train_set(poisoned_dir / "train.txt", victim.clean, poisoned, config["augment_poison"])
    plain = HashListDataset(train_set.image_list,
                            image_transform(victim.clean["image_size"], victim.clean["resize_size"], "none"))
    return train_set, plain, poisoned


def victim_recipe(victim: Victim, workers: int, amp: str = "auto") -> argparse.Namespace:
    """The clean recipe with the victim's seed: a defender's training starts from the victim's weights and batches."""
    recipe = clean_recipe(victim.clean, workers=workers, eval_every=0, amp=amp,
                          cache=batch_source("auto", victim.clean), channels_last="auto")
    recipe.seed = victim.config["seed"]
    return recipe


def undefended_scores(victim: Victim, args: argparse.Namespace, device: torch.device) -> dict:
    """MAP and t-MAP of the backdoored model, with the database codes step 5 saved for it."""
    saved = saved_codes(victim.backdoor_dir / "codes.pt", victim.checkpoint_id)
    return retrieval_scores(victim.model, victim, args, device,
                            (saved["database_codes"], saved["database_labels"]) if saved else None)


def detection_quality(scores: torch.Tensor, poisoned: list[int]) -> dict:
    """AUROC of `scores` (higher: more likely poisoned) for the poisoned images (None when there is no poisoned or
    no clean image), and the mean score of each group."""
    is_poisoned = torch.zeros(len(scores), dtype=torch.bool)
    is_poisoned[poisoned] = True
    both = 0 < len(poisoned) < len(scores)
    return {"auroc": float(roc_auc_score(is_poisoned.numpy(), scores.numpy())) if both else None,
            "mean_score_poisoned": float(scores[is_poisoned].mean()) if poisoned else None,
            "mean_score_other": float(scores[~is_poisoned].mean())}
