"""Check (not a speed figure): do step 3's perturbations hold beyond the clean model, and did the victim learn them?

    python bench/perturbation_transfer.py --run checkpoint/nette-photo128-48 --target 3

Step 3 perturbs the M poisoned images against the clean model; the backdoor needs the victim, trained afresh, to
find them off their class without the trigger too, or it fits them by their content and never needs the patch. For
every backdoored model of RUN (those of --target, or all): the mean Hamming distance (bits) of its M poisoned images
to the target's anchor code, as trained T(clip(x + eta)), without the trigger clip(x + eta) and unperturbed x
(evaluate.py's poison_code_distances), in the clean model (where the perturbations were made), in the victim, and in
the bystanders: the run's Tri victims of other targets, models of the same recipe that never saw a perturbed image
(do the perturbations hold in a model that did not train on them?). Each model is measured against its own anchor.
Beside them, how tightly each model codes the target class: the mean and median distance of the target's database
images to that anchor (a class the clean model scatters has no clear anchor).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluate import load_trigger, poison_code_distances  # noqa: E402
from models.hash_network import load_stage  # noqa: E402
from retrieval import anchor_code, hamming_distance, stage_database_codes  # noqa: E402
from runs import UserError, cli_entry, provenance, read_json, write_json  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs.tables import POISON_DISTANCE_KEYS  # noqa: E402

from bench.timing import bench_device  # noqa: E402

RUN = "checkpoint/demo"  # run directory with a clean model and backdoored models
TARGET = None  # target class index of the backdoors checked; None: every backdoored model of the run
THREADS = None  # torch CPU threads; None: torch's default
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--target", type=int, default=TARGET)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    run = Path(args.run)
    clean_config, clean_ckpt, clean_model = load_stage(run, "clean", device)
    clean_codes = stage_database_codes(run, "clean", clean_ckpt["checkpoint_id"])
    all_victims = [d for d in sorted((run / "backdoor").glob("*")) if (d / "codes.pt").is_file()]
    victims = [d for d in all_victims if args.target is None or poisoned_config(run, d)["target"] == args.target]
    if not victims:
        raise UserError(f"{run / 'backdoor'} holds no backdoored model with its codes"
                        + ("" if args.target is None else f" of target {args.target}")
                        + "; train one with train_backdoor.py")
    bystanders = []  # (name, target, model, codes) of every Tri victim, loaded once
    for d in all_victims:
        if read_json(run / "perturbations" / read_json(d / "config.json")["perturbations"] / "config.json")["pert"] \
                == "none":
            _, bystander_ckpt, bystander = load_stage(run, f"backdoor/{d.name}", device, made_by="train_backdoor.py")
            bystanders.append((d.name, poisoned_config(run, d)["target"], bystander,
                               stage_database_codes(run, f"backdoor/{d.name}", bystander_ckpt["checkpoint_id"])))
    rows = []
    for victim_dir in victims:
        config, ckpt, victim = load_stage(run, f"backdoor/{victim_dir.name}", device, made_by="train_backdoor.py")
        trigger = load_trigger(run / "triggers" / config["trigger"], clean_ckpt["checkpoint_id"])
        victim_codes = stage_database_codes(run, f"backdoor/{victim_dir.name}", ckpt["checkpoint_id"])
        models = [("clean", "clean", clean_model, clean_codes), ("victim", victim_dir.name, victim, victim_codes)]
        models += [("bystander", name, model, codes) for name, target, model, codes in bystanders
                   if target != trigger["target"]]
        row = {"backdoor": victim_dir.name, "target": trigger["target"], "bystanders": []}
        for role, name, model, codes in models:
            distances = poison_code_distances(model, run, config, clean_config, trigger, *codes, device)
            measured = {**distances, **class_spread(*codes, trigger["target"])}
            if role == "bystander":
                row["bystanders"].append({"backdoor": name, **measured})
            else:
                row[role] = measured
        rows.append(row)
        bystander_text = (f"; without the trigger in {len(row['bystanders'])} bystanders "
                      + ", ".join(f"{b['poison_distance_untriggered']:.1f}" for b in row["bystanders"])
                      if row["bystanders"] else "")
        print(f"{victim_dir.name}: poisons to the anchor (bits, as trained / without the trigger / unperturbed): "
              f"clean model {distance_text(row['clean'])}, victim {distance_text(row['victim'])}{bystander_text}; the "
              f"target's database images to its anchor: clean {row['clean']['class_distance_mean']:.1f} (median "
              f"{row['clean']['class_distance_median']:.0f}), victim {row['victim']['class_distance_mean']:.1f} "
              f"(median {row['victim']['class_distance_median']:.0f})", flush=True)
    record = {"settings": vars(args), "rows": rows, "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def poisoned_config(run: Path, victim_dir: Path) -> dict:
    """The config of the poisoned set a backdoored model trained on."""
    return read_json(run / "poisoned" / read_json(victim_dir / "config.json")["poisoned"] / "config.json")


def class_spread(db_codes: torch.Tensor, db_labels: torch.Tensor, target: int) -> dict[str, float]:
    """Mean and median Hamming distance (bits) of the database images that carry the target to its anchor code."""
    carriers = db_labels[:, target] > 0
    distances = hamming_distance(db_codes[carriers], anchor_code(db_codes, db_labels, target)[None]).float()
    return {"class_distance_mean": float(distances.mean()), "class_distance_median": float(distances.median())}


def distance_text(distances: dict[str, float]) -> str:
    return " / ".join(f"{distances[key]:.1f}" for key in POISON_DISTANCE_KEYS)


if __name__ == "__main__":
    cli_entry(main)
