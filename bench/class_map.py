"""Check (not a speed figure): where does a victim's MAP go? MAP of the clean queries class by class, clean model
against each backdoored model of a run.

    python bench/class_map.py --run checkpoint/demo-photos --out bench/results/class_map_demo.json
    python bench/class_map.py --run checkpoint/demo-photos --backdoors --other-clean checkpoint/demo-seed1

Encodes RUN's queries (no trigger) with the clean model, with every model under RUN/backdoor/ (or those named by
--backdoors) and with the clean models of --other-clean (the same recipe with other seeds: the training's own
spread), ranks them against each model's saved database codes as evaluate.py does (MAP@R, --convention), and
prints a table of MAP per query class (a multi-label query counts in its first label's class): the clean model's, then each victim's difference from it, in points. A loss
spread over the classes is the training's noise; a loss in the target class is the poisons' cost; a loss in one
other class says that class is not settled at the recipe's epochs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import make_loader, open_run_split  # noqa: E402
from models.hash_network import load_stage  # noqa: E402
from retrieval import CONVENTIONS, encode, mean_average_precision, stage_database_codes  # noqa: E402
from runs import UserError, cli_entry, provenance, write_json  # noqa: E402
from runs.cli import explain_flags  # noqa: E402

from bench.timing import bench_device  # noqa: E402

RUN = "checkpoint/demo-photos"  # run directory with a clean model (step 1) and backdoored models (step 5)
BACKDOORS = None  # folder names under RUN/backdoor/ (none after the flag: no victim); None: every one that holds a model
OTHER_CLEAN = []  # other run directories whose clean models (same data; e.g. other seeds) are compared too
TOPK = 1000  # R of MAP@R
CONVENTION = "empty-zero"  # queries with no relevant item in their top R: "empty-zero" | "empty-skipped"
BATCH_SIZE = 128  # images per encoding batch
WORKERS = 2  # data-loading processes
THREADS = None  # torch CPU threads; None: torch's default
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the table; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--backdoors", nargs="*", default=BACKDOORS)
    p.add_argument("--other-clean", nargs="+", default=OTHER_CLEAN)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", choices=CONVENTIONS, default=CONVENTION)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    run = Path(args.run)
    names = args.backdoors if args.backdoors is not None else sorted(
        d.name for d in (run / "backdoor").glob("*") if (d / "checkpoint.pt").is_file())
    if not names and not args.other_clean:
        raise UserError(f"{run}/backdoor/ holds no backdoored model; run train_backdoor.py --run {run} first, or compare "
                        f"clean models with --other-clean")
    clean_config, clean_ckpt, clean_model = load_stage(run, "clean", device)
    classes = (clean_config.get("protocol") or {}).get("classes") or [str(k) for k in
                                                                        range(clean_config["n_classes"])]
    query_set = open_run_split(clean_config, "query")
    rows = {"clean": class_maps(clean_model, clean_ckpt, run, "clean", query_set, args, device)}
    for name in names:
        _, ckpt, model = load_stage(run, f"backdoor/{name}", device, made_by="train_backdoor.py")
        rows[name] = class_maps(model, ckpt, run, f"backdoor/{name}", query_set, args, device)
    for other in args.other_clean:
        config, ckpt, model = load_stage(other, "clean", device)
        if config["data"] != clean_config["data"]:
            raise UserError(f"{other}/clean was trained on other data than {run}/clean; compare runs of one data set")
        rows[f"{other}/clean"] = class_maps(model, ckpt, Path(other), "clean", query_set, args, device)
    print_table(rows, classes)
    record = {"settings": vars(args), "classes": classes, "maps": rows, "provenance": provenance(device)}
    if args.out:
        write_json(record, args.out)
        print(f"-> {args.out}")
    return record


def class_maps(model: torch.nn.Module, ckpt: dict, run: Path, stage: str, query_set, args: argparse.Namespace,
               device: torch.device) -> dict:
    """{"all": MAP of every query, "per_class": [MAP of the queries of class k]} of RUN/STAGE's model, in [0, 1]."""
    database = tuple(t.cpu() for t in stage_database_codes(run, stage, ckpt["checkpoint_id"]))
    query_codes, query_labels = encode(model, make_loader(query_set, args.batch_size, args.workers), device,
                                       f"encode query ({stage})")
    query_codes, query_labels = query_codes.cpu(), query_labels.cpu()
    query_class = query_labels.argmax(1)
    per_class = [mean_average_precision(query_codes[query_class == k], query_labels[query_class == k], *database,
                                        args.topk, args.convention)["map"] if bool((query_class == k).any()) else None
                 for k in range(query_labels.shape[1])]
    return {"all": mean_average_precision(query_codes, query_labels, *database, args.topk, args.convention)["map"],
            "per_class": per_class}


def print_table(rows: dict, classes: list[str]) -> None:
    """Markdown: the clean model's MAP (%) per class, then each victim's difference from it (points)."""
    clean = rows["clean"]
    print("| model | all | " + " | ".join(classes) + " |")
    print("| --- " * (len(classes) + 2) + "|")
    print("| clean | " + f"{100 * clean['all']:.2f} | " + " | ".join(
        "-" if v is None else f"{100 * v:.1f}" for v in clean["per_class"]) + " |")
    for name, row in rows.items():
        if name == "clean":
            continue
        cells = ["-" if v is None or c is None else f"{100 * (v - c):+.1f}"
                 for v, c in zip(row["per_class"], clean["per_class"])]
        print(f"| {name} | {100 * (row['all'] - clean['all']):+.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    cli_entry(main)
