"""Step 6: retrieval quality of a run's model: MAP@R over Hamming ranking on the query split.

    python evaluate.py --run checkpoint/demo

Reads RUN/STAGE/ (config.json, checkpoint.pt, codes.pt), encodes the queries, reuses the database codes that
train_hash.py saved when they belong to the same checkpoint (else encodes the database), and writes
RUN/STAGE/results.json. Both conventions for queries with no relevant item in the top R are reported:
`map_empty_zero` (AP 0, DeepHash-pytorch and BadHash) and `map_empty_skipped` (left out, CIBA's code); `map` is the
one named by --convention. Ties in Hamming distance are broken by database index.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from data import make_loader, open_run_split
from models.hashnet import load_stage
from retrieval import CONVENTIONS, encode, mean_average_precision
from runs import cli_entry, pick_device, provenance, require_at_least_one, write_json

RUN = "checkpoint/demo"
STAGE = "clean"  # sub-folder of the run holding the model to evaluate
TOPK = 1000  # R of MAP@R
CONVENTION = "empty-zero"  # which convention `map` reports: "empty-zero" | "empty-skipped"
BATCH_SIZE = 256
WORKERS = 4
DEVICE = "auto"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--stage", default=STAGE)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    args = p.parse_args(argv)
    require_at_least_one(args, "topk", "batch_size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    stage_dir = Path(args.run) / args.stage
    config, ckpt, model = load_stage(args.run, args.stage, device)
    t0 = time.time()
    query_set = open_run_split(config, "query")
    q_codes, q_labels = encode(model, make_loader(query_set, args.batch_size, args.workers), device, "encode query")
    db_codes, db_labels = saved_database_codes(stage_dir / "codes.pt", ckpt["checkpoint_id"])
    if db_codes is None:
        database_set = open_run_split(config, "database")
        db_codes, db_labels = encode(model, make_loader(database_set, args.batch_size, args.workers), device,
                                     "encode database")
    t1 = time.time()
    result = mean_average_precision(q_codes.to(device), q_labels, db_codes, db_labels, args.topk, args.convention)
    t2 = time.time()
    result.update(stage=args.stage, arch=config["arch"], bits=config["bits"], loss=config["loss"],
                  epochs=ckpt["epoch"], protocol=(config.get("protocol") or {}).get("name"),
                  n_database=int(db_codes.shape[0]), checkpoint_id=ckpt["checkpoint_id"],
                  seconds={"encode": round(t1 - t0, 2), "map": round(t2 - t1, 3)},
                  provenance=provenance(device))
    write_json(result, stage_dir / "results.json")
    skipped = result["map_empty_skipped"]
    print(f"{args.stage}: MAP@{args.topk} {result['map_empty_zero']:.4f} (empty-zero) "
          f"{'n/a' if skipped is None else f'{skipped:.4f}'} (empty-skipped), {result['n_queries']} queries "
          f"({result['n_queries_empty']} with no relevant item in the top {args.topk}), "
          f"{result['n_database']} database items -> {stage_dir / 'results.json'}")
    return result


def saved_database_codes(path: Path, checkpoint_id: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The database codes train_hash.py saved, if they were made by this very checkpoint."""
    if not path.exists():
        return None, None
    try:
        saved = torch.load(path, weights_only=False)
    except Exception:  # unreadable codes are recomputed, never trusted
        return None, None
    if not isinstance(saved, dict) or saved.get("checkpoint_id") != checkpoint_id:
        return None, None
    return saved["database_codes"], saved["database_labels"]


if __name__ == "__main__":
    cli_entry(main)
