"""Benchmark: MAP@R of the project's evaluator (retrieval.mean_average_precision) against the per-query NumPy form
of the public deep-hashing code (for each query: label overlap with the whole database, Hamming distances, a full
argsort, AP over the top R).

    python bench/map_at_r.py                      # 1,000 x 59,000 and 5,000 x 128,000, 64 bits, R = 1000
    python bench/map_at_r.py --sizes 1000x59000 --out map.json

Random codes with class structure: each class has a random centre code and every item flips each of its centre's
bits with probability --flip, so many database items tie in distance. Both sides break ties in the same scrambled
index order (retrieval.metrics.TIE_BREAK; the NumPy side puts its database in that order once and sorts each query's
distances stably, the cheapest per-query form with the same ties), so the top-R lists must be identical, and are
compared in full; the MAP values
are compared too (they may differ in the last bits of a float64 because the two sum in different orders).

Each side is timed --repeats times, the two alternating (so that a slower spell of a shared machine falls on both);
the table gives the medians and the ratio of the medians, the JSON every time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval import hamming_rank, mean_average_precision  # noqa: E402
from retrieval.metrics import TIE_MULTIPLIER  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, require_at_least_one, write_json  # noqa: E402

from bench.timing import alternating, bench_device  # noqa: E402

SIZES = ("1000x59000", "5000x128000")  # QUERIESxDATABASE: CIFAR-10's and ImageNet-100's protocols
CLASSES = (10, 100)  # classes per size
BITS = 64  # code length
TOPK = 1000  # R of MAP@R
FLIP = 0.2  # probability that an item flips each bit of its class centre
REPEATS = 3  # timed runs of each side, alternating
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # codes and labels
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--classes", type=int, nargs="+", default=list(CLASSES))
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--flip", type=float, default=FLIP)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "bits", "topk", "repeats")
    if len(args.classes) != len(args.sizes):
        raise UserError(f"--classes has {len(args.classes)} values for {len(args.sizes)} --sizes; give one per size")
    try:
        args.shapes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    except ValueError:
        raise UserError(f"--sizes {' '.join(args.sizes)}: write each as QUERIESxDATABASE, e.g. 1000x59000") from None
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        raise UserError(f"--sizes {' '.join(args.sizes)}: write each as QUERIESxDATABASE with positive counts")
    if not 0 <= args.flip <= 0.5:
        raise UserError(f"--flip {args.flip} is outside [0, 0.5]")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    rows = []
    for (n_queries, n_database), n_classes in zip(args.shapes, args.classes):
        rows.append(compare(n_queries, n_database, n_classes, args, device))
    print(f"\n| queries x database | NumPy per query (s, median) | ours (s, median) | speed-up | "
          f"top-{args.topk} lists | largest MAP difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['queries']:,} x {r['database']:,} | {r['numpy_seconds']:.2f} | {r['ours_seconds']:.3f} | "
              f"x{r['speedup']:.1f} | {'identical' if r['rankings_identical'] else 'DIFFER'} | "
              f"{r['map_difference']:.1e} |")
    record = {"settings": {k: v for k, v in vars(args).items() if k != "shapes"}, "threads": torch.get_num_threads(),
              "rows": rows, "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def compare(n_queries: int, n_database: int, n_classes: int, args: argparse.Namespace, device: torch.device) -> dict:
    q_codes, q_labels, db_codes, db_labels = class_codes(n_queries, n_database, n_classes, args.bits, args.flip,
                                                         args.seed)
    q_dev, ql_dev = q_codes.to(device), q_labels.to(device)
    db_dev, dbl_dev = db_codes.to(device), db_labels.to(device)
    mean_average_precision(q_dev[:8], ql_dev[:8], db_dev, dbl_dev, args.topk)  # warm-up (allocator, kernels)
    q_np, db_np, ql_np, dbl_np = (t.float().numpy() for t in (q_codes, db_codes, q_labels, db_labels))
    (ours, (numpy_map, numpy_top)), (ours_times, numpy_times) = alternating(
        [lambda: mean_average_precision(q_dev, ql_dev, db_dev, dbl_dev, args.topk),
         lambda: per_query_map(q_np, db_np, ql_np, dbl_np, args.topk)], args.repeats, device)
    ours_top = hamming_rank(q_dev, db_dev, args.topk).cpu().numpy()
    ours_seconds, numpy_seconds = statistics.median(ours_times), statistics.median(numpy_times)
    row = {"queries": n_queries, "database": n_database, "classes": n_classes, "bits": args.bits, "topk": args.topk,
           "numpy_seconds": round(numpy_seconds, 3), "ours_seconds": round(ours_seconds, 4),
           "numpy_seconds_each": [round(t, 3) for t in numpy_times],
           "ours_seconds_each": [round(t, 4) for t in ours_times],
           "speedup": numpy_seconds / ours_seconds, "map_ours": ours["map_empty_zero"], "map_numpy": numpy_map,
           "map_difference": abs(ours["map_empty_zero"] - numpy_map),
           "rankings_identical": bool(np.array_equal(ours_top, numpy_top))}
    print(f"{n_queries} x {n_database}: NumPy per query {numpy_seconds:.2f} s, ours {ours_seconds:.3f} s "
          f"(medians of {args.repeats}; x{row['speedup']:.1f}, {device}), "
          f"MAP@{args.topk} {numpy_map:.6f} vs {ours['map_empty_zero']:.6f}, "
          f"top-{args.topk} lists {'identical' if row['rankings_identical'] else 'DIFFER'}", flush=True)
    return row


def class_codes(n_queries: int, n_database: int, n_classes: int, bits: int, flip: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """+-1 int8 codes and one-hot uint8 labels: each item is its class centre with bits flipped at rate `flip`."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randint(0, 2, (n_classes, bits), generator=generator) * 2 - 1

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(n_classes, (n,), generator=generator)
        flips = torch.rand(n, bits, generator=generator) < flip
        codes = torch.where(flips, -centres[labels], centres[labels]).to(torch.int8)
        return codes, torch.nn.functional.one_hot(labels, n_classes).to(torch.uint8)

    return (*draw(n_queries), *draw(n_database))


def per_query_map(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray,
                  topk: int) -> tuple[float, np.ndarray]:
    """The public code's form, one query at a time (queries with no relevant item in the top R count 0), with ties
    in the scrambled index order of retrieval.metrics. Returns MAP@R and the top-R lists."""
    bits = q_codes.shape[1]
    tie_keys = np.arange(len(db_codes), dtype=np.uint64) * np.uint64(TIE_MULTIPLIER) % np.uint64(1 << 32)
    tie_rank = np.argsort(tie_keys)  # the database in tie order, once; a stable sort per query then keeps it
    db_codes, db_labels = db_codes[tie_rank], db_labels[tie_rank]
    total, tops = 0.0, np.empty((len(q_codes), min(topk, len(db_codes))), dtype=np.int64)
    for i in range(len(q_codes)):
        relevant = (q_labels[i] @ db_labels.T > 0).astype(np.float64)
        distance = 0.5 * (bits - q_codes[i] @ db_codes.T)
        order = np.argsort(distance, kind="stable")
        tops[i] = tie_rank[order[:topk]]
        hits = relevant[order][:topk]
        n_hits = int(hits.sum())
        if n_hits:
            total += float(np.mean(np.arange(1, n_hits + 1) / (np.flatnonzero(hits) + 1.0)))
    return total / len(q_codes), tops


if __name__ == "__main__":
    cli_entry(main)
