"""Step 5: the victim trains on the poisoned training list, with exactly the clean recipe of the run.

    python train_backdoor.py --run checkpoint/demo --poisoned ciba-t3-s4__confusing-t3-m60-e8-l0.8-b20-s20-seed0

Reads RUN/clean/config.json (the recipe of step 1: architecture, bits, loss, image size, augmentation, optimiser,
learning rates, schedule, epochs, batch size, seed) and the poisoned list of step 4 (RUN/poisoned/NAME/train.txt,
which holds each poisoned image in place of its original with the original label). The model starts from the same
weights as step 1 (same seed, same pretrained weights) and sees its batches in the same seeded order, so the clean
and the backdoored model differ only by the poisoned images. As in the CIBA paper's code the poisoned images are not
augmented (the rest are); --augment-poison gives them the clean images' augmentation too. --seed other than the
clean run's gives other starting weights and batch order.

Writes RUN/backdoor/NAME[-augment-poison][-seedS]/ like step 1: config.json, checkpoint.pt (every epoch; --resume
continues it), history.json and codes.pt (database codes, reused by evaluate.py).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Subset

from data import HashListDataset, image_transform, make_loader, open_run_split, read_list
from models import build_loss, build_model
from models.hash_network import read_clean
from models.training import TRAJECTORY_KEYS, add_fast_path_flags, fit, query_subset
from retrieval import encode
from runs import (UserError, add_deterministic_flag, cli_entry, distributed, fingerprint, load_saved,
                  make_deterministic, pick_output, provenance, read_json)
from triggers import trigger_transform
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with a clean model and a poisoned set (steps 1-4)
POISONED = None  # folder name under RUN/poisoned/ (step 4); None: the only one there
AUGMENT_POISON = False  # give the poisoned images the clean images' augmentation (paper's code: no)
SEED = None  # None: the clean run's seed (same starting weights and batch order as step 1)
EVAL_EVERY = 0  # epochs between query-subset MAP evaluations (0: only at the end)
WORKERS = 4  # data-loading processes
AMP = "auto"  # bfloat16 autocast: "auto" (on CUDA), "on", "off"
CACHE = "auto"  # decoded training images: "auto" (cached when step 1 was), "off", "memory" (host), "device" (GPU)
CHANNELS_LAST = "auto"  # channels-last input batches: "auto" (CUDA, and Lite0 on the CPU), "on", "off"
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
TRACK_TRIGGER_DISTANCE = 0  # Figure 2(b): N queries' distance to the trigger-only code per epoch (paper 1,000); 0: off
RESUME = False  # continue from the victim's checkpoint.pt
OVERWRITE = False  # replace a finished victim and its results

# the clean run's settings step 5 trains with: those that shape the model and its trajectory, and the epochs and MAP
# the head is read with clean.get: runs made before heads existed have none (their architecture's own)
RECIPE_KEYS = (*(k for k in TRAJECTORY_KEYS if k != "head"), "epochs", "eval_queries", "topk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--poisoned", default=POISONED)
    p.add_argument("--augment-poison", default=AUGMENT_POISON, action=argparse.BooleanOptionalAction)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--track-trigger-distance", type=int, default=TRACK_TRIGGER_DISTANCE, metavar="N")
    p.add_argument("--workers", type=int, default=WORKERS)
    add_fast_path_flags(p, AMP, CACHE, CHANNELS_LAST)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--resume", default=RESUME, action="store_true")
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    if args.eval_every < 0:
        raise UserError(f"--eval-every must be 0 (only at the end) or more, got {args.eval_every}")
    if args.track_trigger_distance < 0:
        raise UserError(f"--track-trigger-distance must be 0 (off) or a number of images, got "
                        f"{args.track_trigger_distance}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    run = Path(args.run)
    clean, clean_id = read_clean(run)
    poisoned_dir = pick_output(run / "poisoned", args.poisoned, "config.json", "poison_dataset.py", "--poisoned")
    poisoning = read_json(poisoned_dir / "config.json")
    if poisoning.get("clean_checkpoint_id") != clean_id:
        raise UserError(f"{poisoned_dir} was made from another clean model than the one in {run / 'clean'}; "
                        f"make it again with poison_dataset.py --overwrite (after steps 2 and 3)")
    device = distributed.training_device(args.device)  # under torchrun: this process's device
    recipe = clean_recipe(clean, workers=args.workers, eval_every=args.eval_every, amp=args.amp,
                          cache=batch_source(args.cache, clean), channels_last=args.channels_last)
    if args.seed is not None:
        recipe.seed = args.seed
    out = run / "backdoor" / backdoor_name(poisoned_dir.name, args.augment_poison, args.seed, clean["seed"])

    manifest = read_json(poisoned_dir / "manifest.json")
    poisoned_indices = [entry["index"] for entry in manifest]
    train_set = poisoned_train_set(poisoned_dir / "train.txt", clean, poisoned_indices, args.augment_poison)
    query_set = open_run_split(clean, "query")
    database_set = open_run_split(clean, "database")
    config = {**vars(recipe), "data": clean["data"], "data_root": clean.get("data_root"),
              "prefix_from": clean.get("prefix_from"), "prefix_to": clean.get("prefix_to", ""),
              "protocol": clean.get("protocol"), "stage": f"backdoor/{out.name}", "poisoned": poisoned_dir.name,
              "train_list": str((poisoned_dir / "train.txt").resolve()), "augment_poison": args.augment_poison,
              "poisoned_id": poisoned_fingerprint(poisoned_dir),
              "poison_num": len(poisoned_indices), "target": poisoning["target"],
              "trigger": poisoning["trigger"], "perturbations": poisoning["perturbations"],
              "clean_checkpoint_id": clean_id, "track_trigger_distance": args.track_trigger_distance,
              "counts": {"train": len(train_set), "query": len(query_set), "database": len(database_set)},
              "provenance": provenance(device)}

    torch.manual_seed(recipe.seed)  # the same starting weights as step 1 (train_hash.py seeds the same way)
    model = build_model(recipe.arch, recipe.bits, recipe.pretrained, recipe.head, recipe.image_size).to(device)
    loss_fn = build_loss(recipe.loss, recipe.bits, recipe.n_classes, recipe.pairwise_norm, recipe.quant_weight)
    print(f"backdoor training on {poisoned_dir / 'train.txt'}: {len(poisoned_indices)} poisoned of "
          f"{len(train_set)} images ({'augmented' if args.augment_poison else 'not augmented'}), recipe of "
          f"{run / 'clean'} ({recipe.arch}, {recipe.bits} bits, {recipe.epochs} epochs, seed {recipe.seed})")
    hook = None
    if args.track_trigger_distance:
        hook = trigger_distance_hook(run / "triggers" / poisoning["trigger"], query_set, args.track_trigger_distance,
                                     recipe.seed, clean["image_size"], args.workers, device)
    result = fit(model, loss_fn.to(device), recipe, train_set, query_set, database_set, out, config, device,
                 args.resume, args.overwrite, epoch_hook=hook)
    distributed.finish()
    return {**result, "name": out.name}


def poisoned_fingerprint(poisoned_dir: Path) -> str:
    """A short content hash of step 4's output (its list, manifest and what it was made from): --resume refuses a
    checkpoint trained on a poisoned set that has been made again since."""
    made = read_json(poisoned_dir / "config.json")
    return fingerprint((poisoned_dir / "train.txt").read_bytes(), (poisoned_dir / "manifest.json").read_bytes(),
                       repr((made.get("trigger_id"), made.get("perturbations_id"))))


def trigger_distance_hook(trigger_dir: Path, query_set, n_images: int, seed: int, image_size: int, workers: int,
                          device: torch.device) -> Callable[[torch.nn.Module], dict]:
    """fit's epoch hook for --track-trigger-distance: the trigger distance of `n_images` query images drawn with the
    seed (the same images every epoch)."""
    trigger = load_saved(trigger_dir / "trigger.pt", "gen_trigger.py")
    images = Subset(query_set, query_subset(len(query_set), n_images, seed))
    loader = make_loader(images, 256, workers)
    transform = trigger_transform(trigger, trigger_dir.parent.parent, device)
    return lambda model: {"trigger_distance": trigger_distance(model, loader, transform, image_size, device)}


def trigger_distance(model: torch.nn.Module, loader, transform: Callable[[torch.Tensor], torch.Tensor],
                     image_size: int, device: torch.device) -> float:
    """Figure 2(b): mean Hamming distance between the code of each image with the trigger, B(x, p), and the code of
    the trigger alone, B(0, p) (an all-zero image with the trigger); a backdoor that works drives it towards 0."""
    triggered, _ = encode(model, loader, device, "trigger distance", progress=False, transform=transform)
    blank = torch.zeros(1, 3, image_size, image_size)
    alone, _ = encode(model, [(blank, torch.zeros(1, 1), 0)], device, progress=False, transform=transform)
    bits = triggered.shape[1]
    return float(((bits - triggered.float() @ alone.float().t()) / 2).mean())


def clean_recipe(clean: dict, **run_settings) -> argparse.Namespace:
    """The clean run's training recipe (RECIPE_KEYS and its head) with this run's own settings (workers, fast path,
    evaluation): what a model trained again on the run's data trains with."""
    return argparse.Namespace(**{k: clean[k] for k in RECIPE_KEYS}, head=clean.get("head"), **run_settings)


def batch_source(cache: str, clean: dict) -> str:
    """--cache auto follows step 1: the cached and the DataLoader paths draw batches and augmentations from
    different random streams, so the victim sees step 1's batches only on step 1's path (runs made before the cache
    existed, without `fast_path` in their config, used the DataLoader)."""
    if cache != "auto":
        return cache
    return "off" if (clean.get("fast_path") or {}).get("cache", "off") == "off" else "auto"


def backdoor_name(poisoned: str, augment_poison: bool, seed: int | None, clean_seed: int) -> str:
    """RUN/backdoor/ folder name: the poisoned set's name, plus the options that change the training."""
    name = poisoned + ("-augment-poison" if augment_poison else "")
    return name + (f"-seed{seed}" if seed is not None and seed != clean_seed else "")


def poisoned_train_set(list_file: Path, clean: dict, poisoned_indices: list[int],
                       augment_poison: bool) -> HashListDataset:
    """The poisoned training list (absolute paths, as step 4 writes it) with the clean recipe's augmentation; the
    poisoned entries get none unless `augment_poison`."""
    image_list = read_list(os.fspath(list_file), n_classes=clean["n_classes"])
    size, resize = clean["image_size"], clean["resize_size"]
    if max(poisoned_indices, default=-1) >= len(image_list):
        raise UserError(f"{list_file} has {len(image_list)} entries but its manifest names entry "
                        f"{max(poisoned_indices)}; make the poisoned set again with poison_dataset.py --overwrite")
    plain = () if augment_poison else poisoned_indices
    return HashListDataset(image_list, image_transform(size, resize, clean["augment"]), plain_indices=plain,
                           plain_transform=image_transform(size, resize, "none"))


if __name__ == "__main__":
    cli_entry(main)
