"""Helpers of the table commands (table1.py, table3.py): target choice, reuse of step 6 results, Markdown and CSV."""
from __future__ import annotations

import csv
import io
import shlex
import sys
from pathlib import Path

import numpy as np

from data.protocols import resolve_class
from runs.errors import UserError
from runs.io import read_json

# what every row of a table takes from a results.json of step 6 (reuse requires all of them)
RESULT_KEYS = ("t_map", "map", "t_map_empty_zero", "t_map_empty_skipped", "map_empty_zero", "map_empty_skipped",
               "clean_map", "t_n_queries", "poison_num", "trigger_size", "eps", "lam", "trigger_bits_changed",
               "target_distance_queries", "target_distance_triggered")


def choose_targets(targets: list[str] | None, count: int, classes: list[str] | None, n_classes: int,
                   seed: int) -> list[int]:
    """The classes given (indices or names), or `count` classes drawn with the seed (sorted)."""
    if targets is not None:
        return [resolve_class(t, classes, n_classes) for t in targets]
    if count > n_classes:
        raise UserError(f"--num-targets {count} is more than the {n_classes} classes of the data")
    return sorted(np.random.default_rng(seed).choice(n_classes, count, replace=False).tolist())


def reuse_results(path: Path, model_id: str, trigger_id: str, topk: int, convention: str,
                  keys: tuple[str, ...] = RESULT_KEYS) -> dict | None:
    """A results.json of step 6 made from this checkpoint and trigger with the same R and convention, else None."""
    if not path.exists():
        return None
    result = read_json(path)
    made_with = tuple(result.get(k) for k in ("checkpoint_id", "trigger_id", "topk", "convention"))
    if made_with != (model_id, trigger_id, topk, convention) or any(k not in result for k in keys):
        return None
    print(f"{path} is up to date; reusing it")
    return result


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over the rows (targets); None when any row lacks the value (empty-skipped with no relevant item)."""
    values = [row[key] for row in rows]
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def target_label(target: int, name: str | None) -> str:
    return f"{target} ({name})" if name else str(target)


def seconds_text(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{np.mean(known):.1f}" if known else "-"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]


def csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def command_line(script: str) -> str | None:
    """The command that made a table, when the script was run from the shell."""
    if not sys.argv[0].endswith(script):
        return None
    return f"python {script} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
