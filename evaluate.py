"""Step 6: MAP with clean queries and t-MAP with triggered queries, both @R over Hamming ranking.

    python evaluate.py --run checkpoint/demo                          # clean model: MAP
    python evaluate.py --run checkpoint/demo --trigger ciba-t3-s4     # clean model + trigger: the "None" row
    python evaluate.py --run checkpoint/demo --backdoor NAME          # backdoored model of step 5: MAP and t-MAP

MAP: every query against the database, relevant = shares a label with the query. t-MAP (Section 4.1): the queries
whose labels exclude the target, with the trigger applied (B(x, p) of Eq. 6 for a patch, the blend for Blend,
BadHash's generator output for BadHash), against the database encoded by the same model, relevant = carries the
target label. --backdoor uses the trigger its training set was poisoned with.
The clean model's MAP is computed beside every evaluation. Both conventions for queries with no relevant item in
the top R are reported (`*_empty_zero`: AP 0, DeepHash-pytorch and BadHash; `*_empty_skipped`: left out, CIBA's
code); `map` and `t_map` are the ones named by --convention. Ties in Hamming distance are broken in a fixed scrambled
order of the database indices (retrieval.metrics.TIE_BREAK, recorded as `ties`).
Database codes saved by steps 1 and 5 are reused when they belong to the same checkpoint. To show what the trigger
does to the codes, results.json also holds the mean number of bits it flips in a query's code and the mean distance
of the queries to the target's anchor code with and without it; for a backdoored model, also the mean distance to
that anchor of its M poisoned training images as trained, without the trigger and unperturbed (did the victim
learn them through the trigger, or through the images themselves?).

Writes results.json into the evaluated model's folder (RUN/clean/results.json, RUN/clean/results-<trigger>.json for
the "None" row, RUN/backdoor/NAME/results.json) and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from data import make_loader, open_run_split
from models.hash_network import load_stage
from retrieval import (CONVENTIONS, anchor_code, encode, hamming_distance, mean_average_precision, non_target_queries,
                       saved_codes, targeted_map)
from runs import (UserError, add_deterministic_flag, cli_entry, load_saved, make_deterministic, pick_device,
                  pick_output, provenance, read_json, require_at_least_one, write_json, write_timing)
from runs.tables import POISON_DISTANCE_KEYS
from triggers import poison_images, trigger_fingerprint, trigger_transform
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory (step 1 and, for --backdoor, steps 2-5)
BACKDOOR = None  # folder name under RUN/backdoor/ (step 5): evaluate that model; None: the clean model
TRIGGER = None  # folder name under RUN/triggers/ (step 2): t-MAP of the clean model with it (the "None" row)
TOPK = 1000  # R of MAP@R and t-MAP@R
CONVENTION = "empty-zero"  # which convention `map` and `t_map` report: "empty-zero" | "empty-skipped"
BATCH_SIZE = 256  # images per encoding batch
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...

# method names of the paper's tables: the trigger of step 2 and the perturbation of step 3
TRIGGER_NAMES = {"ciba": "Tri", "badnets": "BadNets", "blend": "Blend", "reflection": "Reflection", "iab": "IAB",
                 "badhash": "BadHash"}
PERT_SUFFIXES = {"none": "", "noise": "+Noise", "adv": "+Adv", "confusing": "+Confusing"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--backdoor", default=BACKDOOR)
    p.add_argument("--trigger", default=TRIGGER)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "topk", "batch_size")
    if args.backdoor is not None and args.trigger is not None:
        raise UserError("give --backdoor (evaluated with the trigger it was poisoned with) or --trigger (the clean "
                        "model with that trigger), not both")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    run = Path(args.run)
    device = pick_device(args.device)
    t0 = time.time()
    clean_config, clean_ckpt, clean_model = load_stage(run, "clean", device)
    clean_id = clean_ckpt["checkpoint_id"]
    query_set = open_run_split(clean_config, "query")
    clean_codes = model_codes(clean_model, clean_config, run / "clean", clean_id, query_set, args, device)
    clean_result = mean_average_precision(*clean_codes, args.topk, args.convention)
    result = {"method": "clean", "stage": "clean", "arch": clean_config["arch"], "bits": clean_config["bits"],
              "loss": clean_config["loss"], "protocol": (clean_config.get("protocol") or {}).get("name"),
              **clean_result, "clean_map": clean_result["map"], "clean_map_empty_zero": clean_result["map_empty_zero"],
              "clean_map_empty_skipped": clean_result["map_empty_skipped"], "checkpoint_id": clean_id,
              "clean_checkpoint_id": clean_id,
              "epochs": clean_ckpt["epoch"], "poison_num": 0, "eps": None, "lam": None, "pert": None,
              "seeds": {"clean_training": clean_config.get("seed")}}
    model, codes, out, trigger_dir = clean_model, clean_codes, run / "clean" / "results.json", None
    if args.backdoor is not None:
        backdoor_dir = pick_output(run / "backdoor", args.backdoor, "codes.pt", "train_backdoor.py", "--backdoor")
        config, ckpt, model = load_stage(run, f"backdoor/{backdoor_dir.name}", device, made_by="train_backdoor.py")
        check_same_model(config, clean_config, clean_id, backdoor_dir, run)
        codes = model_codes(model, config, backdoor_dir, ckpt["checkpoint_id"], query_set, args, device)
        backdoor_result = mean_average_precision(*codes, args.topk, args.convention)
        trigger_dir = run / "triggers" / config["trigger"]
        perturbation = read_json(run / "perturbations" / config["perturbations"] / "config.json")
        poison = read_json(run / "poisoned" / config["poisoned"] / "config.json")
        result.update(backdoor_result, stage=f"backdoor/{backdoor_dir.name}", epochs=ckpt["epoch"],
                      checkpoint_id=ckpt["checkpoint_id"], poisoned=config["poisoned"],
                      augment_poison=config["augment_poison"], poison_num=config["poison_num"],
                      poison_rate=poison["poison_rate"], setting=poison.get("label_setting", "clean-label"),
                      psnr_mean=poison["psnr_mean"], ssim_mean=poison["ssim_mean"],
                      pert=perturbation["pert"], eps=None if perturbation["pert"] == "none" else perturbation["eps"],
                      lam=perturbation["lam"] if perturbation["pert"] in ("adv", "confusing") else None,
                      perturbations=config["perturbations"])
        result["seeds"].update(perturbations=perturbation.get("seed"), backdoor_training=config.get("seed"))
        out = backdoor_dir / "results.json"
    elif args.trigger is not None:
        trigger_dir = pick_output(run / "triggers", args.trigger, "trigger.pt", "gen_trigger.py", "--trigger")
        out = run / "clean" / f"results-{trigger_dir.name}.json"
    if trigger_dir is not None:
        trigger = load_trigger(trigger_dir, clean_id)
        result["seeds"]["trigger"] = read_json(trigger_dir / "config.json").get("seed")
        target = trigger["target"]
        keep, triggered = triggered_codes(model, query_set, codes[1], trigger, run, args, device)
        targeted = targeted_map(triggered, target, codes[2], codes[3], args.topk, args.convention)
        target_names = (clean_config.get("protocol") or {}).get("classes")
        result.update({f"t_{key}": targeted[key] for key in ("map", "map_empty_zero", "map_empty_skipped",
                                                             "n_queries", "n_queries_empty")})
        result.update(trigger_code_distances(codes[0][keep.to(device)], triggered, codes[2], codes[3], target))
        result.update(poison_code_distances(model, run, config, clean_config, trigger, codes[2], codes[3], device)
                      if args.backdoor is not None else dict.fromkeys(POISON_DISTANCE_KEYS))
        result.update(method="None" if args.backdoor is None else method_name(trigger["method"], result["pert"]),
                      target=target, target_name=target_names[target] if target_names else None,
                      trigger=trigger_dir.name, trigger_id=trigger_fingerprint(trigger),
                      trigger_method=trigger["method"], trigger_size=trigger["trigger_size"])
    result.update(n_database=int(codes[2].shape[0]), provenance=provenance(device))
    write_timing(out, {"seconds": round(time.time() - t0, 2)})
    write_json(result, out)
    print(summary_line(result, args.topk, out))
    return result


def model_codes(model: torch.nn.Module, config: dict, stage_dir: Path, checkpoint_id: str, query_set,
                args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(query codes on the device, query labels, database codes, database labels) of one model; the database codes
    saved with its checkpoint are reused when they belong to it."""
    query_codes, query_labels = encode(model, make_loader(query_set, args.batch_size, args.workers), device,
                                       "encode query")
    saved = saved_codes(stage_dir / "codes.pt", checkpoint_id)
    if saved is not None:
        db_codes, db_labels = saved["database_codes"], saved["database_labels"]
    else:
        database_set = open_run_split(config, "database")
        db_codes, db_labels = encode(model, make_loader(database_set, args.batch_size, args.workers), device,
                                     "encode database")
    return query_codes.to(device), query_labels, db_codes, db_labels


def check_same_model(config: dict, clean: dict, clean_id: str, backdoor_dir: Path, run: Path) -> None:
    """The backdoored model must have the clean model's architecture and bits, and its poison must come from it."""
    for key in ("arch", "bits", "image_size"):
        if config.get(key) != clean.get(key):
            raise UserError(f"{backdoor_dir} holds a model with {key} {config.get(key)!r} but {run / 'clean'} has "
                            f"{clean.get(key)!r}; it belongs to another run: train it again with train_backdoor.py "
                            f"--run {run} --overwrite")
    if config.get("clean_checkpoint_id") != clean_id:
        raise UserError(f"{backdoor_dir} was poisoned against another clean model than the one in {run / 'clean'}; "
                        f"make steps 2-5 again (--overwrite)")


def load_trigger(trigger_dir: Path, clean_id: str) -> dict:
    trigger = load_saved(trigger_dir / "trigger.pt", f"gen_trigger.py --overwrite (the trigger {trigger_dir.name})")
    if trigger["clean_checkpoint_id"] != clean_id:
        raise UserError(f"{trigger_dir} was made against another clean model than the one in the run now; make it "
                        f"again with gen_trigger.py --overwrite")
    return trigger


def method_name(trigger_method: str, pert: str) -> str:
    """Tri, Tri+Noise, Tri+Adv, CIBA (Table 1); BadNets, Blend, BadHash (Table 3), with the perturbation's suffix."""
    if (trigger_method, pert) == ("ciba", "confusing"):
        return "CIBA"
    return TRIGGER_NAMES.get(trigger_method, trigger_method) + PERT_SUFFIXES[pert]


def triggered_codes(model: torch.nn.Module, query_set, query_labels: torch.Tensor, trigger: dict, run: Path,
                    args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, codes of the triggered queries on the device) of the queries whose labels exclude the target."""
    keep = non_target_queries(query_labels, trigger["target"])
    if keep.numel() == 0:
        raise UserError(f"every query carries the target label {trigger['target']}: no query can be triggered")
    loader = make_loader(Subset(query_set, keep.tolist()), args.batch_size, args.workers)
    codes, _ = encode(model, loader, device, "encode triggered query",
                      transform=trigger_transform(trigger, run, device))
    return keep, codes.to(device)


def trigger_code_distances(query_codes: torch.Tensor, triggered: torch.Tensor, db_codes: torch.Tensor,
                           db_labels: torch.Tensor, target: int) -> dict[str, float]:
    """What the trigger does to the codes, in mean Hamming distance (bits) over the triggered queries: to their own
    untriggered code, and to the target class's anchor code (component vote of the target's database codes, as
    Section 4 builds h_a) with and without the trigger."""
    anchor = anchor_code(db_codes, db_labels, target).to(triggered.device).float()
    bits = triggered.shape[1]
    triggered, query_codes = triggered.float(), query_codes.float()
    return {"trigger_bits_changed": float(((bits - (triggered * query_codes).sum(1)) / 2).mean()),
            "target_distance_queries": float(((bits - query_codes @ anchor) / 2).mean()),
            "target_distance_triggered": float(((bits - triggered @ anchor) / 2).mean())}


def poison_code_distances(model: torch.nn.Module, run: Path, config: dict, clean_config: dict, trigger: dict,
                          db_codes: torch.Tensor, db_labels: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Does the victim need the trigger to code its own poisoned training images as the target? Mean Hamming
    distance (bits), in the victim, from the target's anchor code (as in trigger_code_distances) of the M images as
    they were trained, T(clip(x + eta)), of the same images without the trigger, clip(x + eta), and of the
    unperturbed originals x (rebuilt from step 3's perturbations exactly as step 4 made them)."""
    pert = load_saved(run / "perturbations" / config["perturbations"] / "perturbations.pt",
                      f"gen_confusing.py --overwrite ({config['perturbations']})")
    train_set = open_run_split(clean_config, "train")
    originals = torch.stack([train_set[i][0] for i in pert["indices"]])
    images = (poison_images(originals, pert["eta"], trigger_transform(trigger, run, device), device),
              poison_images(originals, pert["eta"], lambda batch: batch), originals)
    anchor = anchor_code(db_codes, db_labels, trigger["target"])[None]
    distances = {}
    for key, batch in zip(POISON_DISTANCE_KEYS, images):
        loader = DataLoader(TensorDataset(batch, torch.zeros(len(batch)), torch.arange(len(batch))), batch_size=256)
        codes, _ = encode(model, loader, device, "encode poisoned", progress=False)
        distances[key] = float(hamming_distance(codes, anchor).mean())
    return distances


def summary_line(result: dict, topk: int, out: Path) -> str:
    text = f"{result['method']} ({result['stage']}, {result['bits']} bits): MAP@{topk} {format_value(result['map'])}"
    if "t_map" in result:
        text += (f", t-MAP@{topk} {format_value(result['t_map'])} (target {result['target']}, "
                 f"{result['t_n_queries']} triggered queries, {result['t_n_queries_empty']} with no target-class item; "
                 f"the trigger moves them from {result['target_distance_queries']:.1f} to "
                 f"{result['target_distance_triggered']:.1f} bits of the target anchor)")
    if result.get("poison_distance_triggered") is not None:
        text += (f"; its {result['poison_num']} poisoned training images lie {result['poison_distance_triggered']:.1f} "
                 f"bits from the anchor ({result['poison_distance_untriggered']:.1f} without the trigger, "
                 f"{result['poison_distance_original']:.1f} unperturbed)")
    if result["stage"] != "clean":
        text += f", clean model MAP@{topk} {format_value(result['clean_map'])}"
    return f"{text} [{result['convention']}] -> {out}"


def format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    cli_entry(main)
