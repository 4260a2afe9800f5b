"""What every defense reads and reports: the attacked run (its backdoored model, trigger and splits), the clean
images a defender holds, and MAP / t-MAP under a model as it is."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import evaluate
import figures
from data import make_loader, open_run_split
from models.hashnet import load_stage, read_clean
from retrieval import encode, mean_average_precision, targeted_map
from runs import UserError, pick_output, read_json


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
        """The clean model's MAP as evaluate.py wrote it beside the backdoored model's (None: not evaluated yet)."""
        path = self.backdoor_dir / "results.json"
        return read_json(path)["clean_map"] if path.is_file() else None


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
