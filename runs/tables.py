"""Helpers of the table commands (table1.py, table3.py): target choice, reuse of step 6 results, Markdown and CSV."""
from __future__ import annotations

import argparse
import csv
import io
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Collection

import numpy as np
import torch

from data.protocols import resolve_class
from retrieval.metrics import TIE_BREAK
from runs.errors import UserError
from runs.io import atomic_write_text, read_json, read_timing, write_json

# step 6's distances of a victim's own poisoned images to the target anchor: as trained, without the trigger,
# unperturbed (None for the clean model)
POISON_DISTANCE_KEYS = ("poison_distance_triggered", "poison_distance_untriggered", "poison_distance_original")
# what every row of a table takes from a results.json of step 6 (reuse requires all of them)
RESULT_KEYS = ("t_map", "map", "t_map_empty_zero", "t_map_empty_skipped", "map_empty_zero", "map_empty_skipped",
               "clean_map", "t_n_queries", "poison_num", "trigger_size", "eps", "lam", "trigger_bits_changed",
               "target_distance_queries", "target_distance_triggered", *POISON_DISTANCE_KEYS)


def poison_distance_text(row: dict) -> str:
    """The victim's poisoned training images to the target anchor (bits): as trained / without the trigger /
    unperturbed; "-" for the clean model (the None row)."""
    if row.get(POISON_DISTANCE_KEYS[0]) is None:
        return "-"
    return " / ".join(f"{row[k]:.1f}" for k in POISON_DISTANCE_KEYS)


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
    """A results.json of step 6 made from this checkpoint and trigger with the same R, convention and tie order
    (retrieval.metrics.TIE_BREAK; results of older code, ranked otherwise, are made again), else None."""
    if not path.exists():
        return None
    result = read_json(path)
    made_with = tuple(result.get(k) for k in ("checkpoint_id", "trigger_id", "topk", "convention", "ties"))
    if made_with != (model_id, trigger_id, topk, convention, TIE_BREAK) or any(k not in result for k in keys):
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


STEPS = ("trigger", "perturbation", "poison", "training", "evaluation")


def step_seconds(run: Path, trigger: str, result_path: Path, pert: str | None = None, poisoned: str | None = None,
                 epoch_seconds: list[float | None] | None = None) -> dict[str, float | None]:
    """Wall time (s) of each step behind one table row, from the timing records of its outputs (runs.io.read_timing);
    steps 3-5 only for a backdoored model (`pert`, `poisoned`, the training's `epoch_seconds`)."""
    seconds = {"trigger": read_timing(run / "triggers" / trigger / "config.json").get("seconds")}
    if pert is not None:
        known = [s for s in epoch_seconds or [] if s is not None]
        seconds.update(perturbation=read_timing(run / "perturbations" / pert / "config.json").get("seconds"),
                       poison=read_timing(run / "poisoned" / poisoned / "config.json").get("seconds"),
                       training=round(sum(known), 2) if known else None)
    seconds["evaluation"] = read_timing(result_path).get("seconds")
    return seconds


def write_timing_table(out: Path, name: str, title: str, header: list[str], table: list[list], rows: list[dict],
                       keys: list[str]) -> str:
    """NAME.timing.md (the mean wall time per step) and NAME.timing.json (each row's seconds, named by `keys`),
    kept apart from the table itself, which a rerun repeats byte for byte."""
    markdown = "\n".join([title, "", *markdown_table(header, table)]) + "\n"
    atomic_write_text(markdown, out / f"{name}.timing.md")
    write_json({"rows": [{**{k: row[k] for k in keys}, "seconds": row["seconds"]} for row in rows]},
               out / f"{name}.timing.json")
    return markdown


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


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


def add_spread_flags(parser: argparse.ArgumentParser) -> None:
    """--gpus and --print-commands of the table commands."""
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU indices: the (run, target) jobs run in parallel, one per GPU at a "
                             "time, then the table is assembled from their results")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one command per (run, target) for a cluster's job array, and the command that "
                             "assembles the table afterwards; run nothing")


def methods_in_paper_order(methods: list[str], rows: Collection[str]) -> list[str]:
    """--methods checked against a table's rows (in the paper's order) and put in that order."""
    unknown = [m for m in methods if m not in rows]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} in --methods; choose from {' '.join(rows)}")
    return [m for m in rows if m in methods]


def parse_gpus(text: str | None) -> list[int]:
    """--gpus "0,1,3" -> [0, 1, 3]; None -> []."""
    if text is None:
        return []
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise UserError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. 0,1,2,3") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise UserError(f"--gpus {text!r}: give distinct GPU indices separated by commas, e.g. 0,1,2,3")
    return gpus


def without_options(parser: argparse.ArgumentParser, argv: list[str], dests: set[str]) -> list[str]:
    """`argv` without the options whose destination is in `dests`, and without their values. The parser must not
    accept abbreviations (allow_abbrev=False), or an abbreviated --gpus would survive into the jobs."""
    actions = parser._option_string_actions  # argparse keeps no public map from flag to action
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        action = actions.get(flag)
        if action is None or action.dest not in dests:
            out.append(argv[i])
            i += 1
            continue
        i += 1
        if "=" in argv[i - 1] or action.nargs == 0:
            continue
        if action.nargs in ("+", "*"):
            while i < len(argv) and argv[i] not in actions and argv[i].split("=", 1)[0] not in actions:
                i += 1
        else:
            i += 1 if action.nargs is None else int(action.nargs)
    return out


def spread(script: str, first: list[list[str]], jobs: list[tuple[str, list[str]]], final: list[str],
           gpus: list[int], print_only: bool, logs: Path) -> None:
    """Run the `first` commands (script and arguments every job needs, e.g. a shared generator) on the first GPU,
    then the jobs (name, arguments of `script`) in parallel over `gpus`, each with --device cuda:G and its output in
    logs/NAME.log; or only print the commands, with `final` (the arguments that assemble the table) last."""
    name = Path(script).name
    if print_only:
        if first:
            print("# 1. once, before the jobs (they share its output):")
            print("\n".join(shell_line(["python", Path(command[0]).name, *command[1:]]) for command in first))
        print("# 2. the jobs, in any order or in parallel (add --device cuda:N where the cluster needs it):")
        print("\n".join(shell_line(["python", name, *argv]) for _, argv in jobs))
        print("# 3. after all of them, to assemble the table (every step is reused):")
        print(shell_line(["python", name, *final]))
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max(gpus) >= available:
        raise UserError(f"--gpus {','.join(map(str, gpus))}: this machine has {available} CUDA device(s); name GPUs "
                        f"0 to {available - 1}, or use --print-commands to run the jobs elsewhere"
                        if available else f"--gpus {','.join(map(str, gpus))}: CUDA is not available on this machine; "
                        f"run without --gpus, or use --print-commands to run the jobs elsewhere")
    logs.mkdir(parents=True, exist_ok=True)
    for command in first:
        shown = shell_line(["python", Path(command[0]).name, *command[1:]])
        print(f"GPU {gpus[0]}: {shown}", flush=True)
        if subprocess.run([sys.executable, *command, "--device", f"cuda:{gpus[0]}"]).returncode:
            raise UserError(f"{shown} failed; fix it before the jobs can run")
    pending, running, failed = list(jobs), {}, []
    while pending or running:
        for gpu in gpus:
            if gpu not in running and pending:
                job, argv = pending.pop(0)
                log = open(logs / f"{job}.log", "w", encoding="utf-8")
                process = subprocess.Popen([sys.executable, script, *argv, "--device", f"cuda:{gpu}"], stdout=log,
                                           stderr=subprocess.STDOUT)
                running[gpu] = (job, process, log)
                print(f"GPU {gpu}: job {job} started (log {logs / f'{job}.log'})", flush=True)
        time.sleep(1)
        for gpu, (job, process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[gpu]
                print(f"GPU {gpu}: job {job} {'finished' if process.returncode == 0 else 'FAILED'}", flush=True)
                if process.returncode:
                    failed.append(job)
    if failed:
        raise UserError(f"job(s) {', '.join(failed)} failed; see their logs in {logs}, fix and run again (finished "
                        f"steps are reused)")


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in command)
