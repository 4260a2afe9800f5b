"""Fault injection: damage the inputs of the steps and kill them at random moments, then check what a user would see.

    python bench/faults.py                       # 12 kills, on a tiny synthetic run in a temporary folder
    python bench/faults.py --kills 30 --seed 1 --out bench/results/faults.json

On a tiny synthetic data set and run (made here, CPU), it first runs steps 1 and 3-5 once without faults as the
reference, then:

- damages one input at a time (a truncated checkpoint, bytes changed inside a checkpoint's weights, an image deleted
  from a list, a list line with a wrong label width, a truncated trigger) and runs the step that reads it: the
  outcome must be exit status 2 with one `error:` line and no output created or changed;
- kills a step (train_hash.py, gen_confusing.py, poison_dataset.py, train_backdoor.py) with SIGKILL after a random
  delay (between the end of its imports and the time the step took in the reference run; halved, up to six times,
  when the step finished first), checks that every file it left is complete (each .pt, .json, .png and list reads
  back), runs the same command again (with --resume for the trainings), and compares the result with the
  reference: the same weights, perturbations or poisoned image bytes.

Prints a summary table (Markdown) and, with --out, writes every trial as JSON with the settings and provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.protocols import Protocol  # noqa: E402
from data.synthetic import generate_synthetic  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, require_at_least_one, write_json  # noqa: E402

KILLS = 12  # random kills, spread over the four steps that run longest
SEED = 0  # where the kills fall
WORK = None  # folder for the data and runs; None: a temporary folder, removed afterwards
OUT = None  # JSON file for the results; None: print only

POISONED = "ciba-t2-s4__confusing-t2-m10-e8-l0.8-b5-s400-seed0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=KILLS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--work", default=WORK)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "kills")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="faults-"))
    if args.work and work.exists() and any(work.iterdir()):
        raise UserError(f"--work {work} is not empty; give a new or empty folder")
    try:
        trials = run_trials(work, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(trials)
    print(summary)
    if args.out:
        write_json({"settings": vars(args), "trials": trials, "summary": summary, "provenance": provenance("cpu")},
                   args.out)
    return {"trials": trials, "summary": summary}


def steps(data: Path) -> dict[str, list[str]]:
    """The commands of the pipeline on the tiny data, relative to a run folder `run` in the working directory."""
    cpu = ["--device", "cpu"]
    return {
        "train_hash": ["train_hash.py", "--data", str(data), "--run", "run", "--recipe", "small32", "--epochs", "8",
                       "--batch-size", "2", "--eval-every", "0", "--workers", "0", *cpu],
        "gen_trigger": ["gen_trigger.py", "--run", "run", "--target", "2", "--trigger-size", "4", "--steps", "20",
                        "--batch-size", "8", "--workers", "0", *cpu],
        "gen_confusing": ["gen_confusing.py", "--run", "run", "--target", "2", "--pert", "confusing", "--poison-num",
                          "10", "--batch", "5", "--steps", "400", *cpu],
        "poison_dataset": ["poison_dataset.py", "--run", "run", *cpu],
        "train_backdoor": ["train_backdoor.py", "--run", "run", "--workers", "0", *cpu],
        "evaluate": ["evaluate.py", "--run", "run", "--topk", "100", "--workers", "0", *cpu],
    }


RESUMABLE = {"train_hash", "train_backdoor"}
KILLED = ("train_hash", "gen_confusing", "poison_dataset", "train_backdoor")


def run(command: list[str], cwd: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / command[0]), *command[1:], *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_trials(work: Path, args: argparse.Namespace) -> list[dict]:
    data = work / "data"
    generate_synthetic(data, n_classes=10, per_class=24, size=32, seed=0,
                       protocol=Protocol("faults", query_per_class=4, train_per_class=10, seed=0))
    commands = steps(data)
    reference = work / "reference"
    reference.mkdir()
    t0 = time.perf_counter()  # what every step spends importing its libraries, before it can write anything
    subprocess.run([sys.executable, "-c", "import torch, torchvision, numpy, PIL, tqdm"], check=True)
    startup = time.perf_counter() - t0
    seconds = {}
    for name, command in commands.items():
        t0 = time.perf_counter()
        done = run(command, reference)
        seconds[name] = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"the reference run failed at {name}: {done.stderr[-2000:]}")
    trials = [damage_trial(work, reference, data, commands, *fault) for fault in damages()]
    rng = random.Random(args.seed)
    for i in range(args.kills):
        step = KILLED[i % len(KILLED)]
        # a moment between the end of the imports and the end the uninterrupted step took
        delay = rng.uniform(startup, max(seconds[step], startup))
        trials.append(kill_trial(work, reference, commands, step, delay))
    return trials


def damages() -> list[tuple[str, str, Callable[[Path, Path], None], str]]:
    """(fault, step run afterwards, damage(run copy, data copy), text the error must contain)."""
    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flip_weights(path: Path) -> None:
        ckpt = torch.load(path, weights_only=False)
        name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][name].view(-1)[:4] += 1.0
        torch.save(ckpt, path)

    def edit_list(path: Path, change: Callable[[list[str]], None]) -> None:
        lines = path.read_text().splitlines()
        change(lines)
        path.write_text("\n".join(lines) + "\n")

    def delete_listed_image(data: Path) -> None:
        (data / (data / "train.txt").read_text().splitlines()[5].split()[0]).unlink()

    return [
        ("truncated checkpoint", "evaluate", lambda r, d: truncate(r / "clean" / "checkpoint.pt"),
         "truncated or corrupted"),
        ("bytes changed inside a checkpoint's weights", "evaluate",
         lambda r, d: flip_weights(r / "clean" / "checkpoint.pt"), "do not match the id recorded"),
        ("truncated trigger", "poison_dataset",
         lambda r, d: (truncate(r / "triggers" / "ciba-t2-s4" / "trigger.pt"), shutil.rmtree(r / "poisoned")),
         "truncated or corrupted"),
        ("image deleted from the training list", "train_hash", lambda r, d: delete_listed_image(d), "image not found"),
        ("list line with a wrong label width", "train_hash",
         lambda r, d: edit_list(d / "query.txt", lambda lines: lines.__setitem__(3, lines[3] + " 0 1")),
         "label vector has 12 values, expected 10"),
    ]


def damage_trial(work: Path, reference: Path, data: Path, commands: dict, fault: str, step: str,
                 damage: Callable[[Path, Path], None], expected: str) -> dict:
    place = work / f"damage-{len(list(work.glob('damage-*')))}"
    shutil.copytree(reference, place)
    shutil.copytree(data, place / "data")
    command = [a if a != str(data) else str(place / "data") for a in commands[step]]
    if step == "train_hash":
        command[command.index("run")] = "new"
    damage(place / "run", place / "data")
    before = snapshot(place)
    done = run(command, place)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    unchanged = snapshot(place) == before
    ok = done.returncode == 2 and len(errors) == 1 and expected in errors[0] and "Traceback" not in done.stderr
    return {"kind": "damage", "fault": fault, "step": step, "exit": done.returncode, "error": errors[-1:],
            "outputs_unchanged": unchanged, "outcome": "clear error, nothing written" if ok and unchanged else "FAILED"}


def kill_trial(work: Path, reference: Path, commands: dict, step: str, delay: float) -> dict:
    """Copy the reference run as it was before `step`, run the step, SIGKILL it after `delay` seconds, check the
    files it left, run it again and compare with the reference. A step that finishes before the kill (it ran faster
    than in the reference run) is tried again from a fresh copy with the delay halved, up to 6 times (the last
    kills may land in the imports, before anything is written)."""
    command = commands[step]
    for attempt in range(1, 7):
        place = work / f"kill-{len(list(work.glob('kill-*')))}"
        place.mkdir()
        shutil.copytree(reference / "run", place / "run", ignore=ignore_outputs_of(step))
        before = set(output_files(place / "run"))
        process = subprocess.Popen([sys.executable, str(REPO / command[0]), *command[1:]], cwd=place,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            break
        delay /= 2
    finished_first = process.returncode != -signal.SIGKILL
    made = [p for p in output_files(place / "run") if p not in before]
    unreadable = [str(p.relative_to(place)) for p in made if not readable(p)]
    leftovers = [str(p.relative_to(place)) for p in (place / "run").rglob(".*.tmp")]
    again = run(command, place, ("--resume",) if step in RESUMABLE else ())
    same = again.returncode == 0 and same_result(step, place / "run", reference / "run")
    outcome = "resumed to the reference result" if same and not unreadable else "FAILED"
    if finished_first and same:
        outcome = "finished before every kill"
    return {"kind": "kill", "step": step, "delay_s": round(delay, 2), "attempts": attempt,
            "finished_before_kill": finished_first, "files_written_before_kill": len(made),
            "unreadable_files": unreadable, "temporary_files_left": leftovers, "rerun_exit": again.returncode,
            "same_as_reference": same, "outcome": outcome}


def ignore_outputs_of(step: str) -> Callable[[str, list[str]], list[str]]:
    """copytree filter: the folders the step (and the steps after it) would write."""
    after = {"train_hash": {"clean", "triggers", "perturbations", "poisoned", "backdoor"},
             "gen_confusing": {"perturbations", "poisoned", "backdoor"},
             "poison_dataset": {"poisoned", "backdoor"}, "train_backdoor": {"backdoor"}}[step]
    return lambda folder, names: [n for n in names if Path(folder).name == "run" and n in after]


def output_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]


def readable(path: Path) -> bool:
    try:
        if path.suffix == ".pt":
            torch.load(path, weights_only=False)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif path.suffix == ".txt":
            return all(len(line.split()) > 1 for line in path.read_text().splitlines() if line.strip())
        return True
    except Exception:
        return False


def same_result(step: str, run: Path, reference: Path) -> bool:
    """The step's product equals the uninterrupted run's: weights, perturbations, or poisoned image bytes."""
    if step in ("train_hash", "train_backdoor"):
        folder = "clean" if step == "train_hash" else f"backdoor/{POISONED}"
        a, b = (torch.load(r / folder / "checkpoint.pt", weights_only=False)["model"] for r in (run, reference))
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if step == "gen_confusing":
        name = POISONED.split("__")[1]
        a, b = (torch.load(r / "perturbations" / name / "perturbations.pt", weights_only=False)
                for r in (run, reference))
        return torch.equal(a["eta"], b["eta"]) and a["indices"] == b["indices"]
    a, b = (sorted((r / "poisoned" / POISONED / "images").iterdir()) for r in (run, reference))
    return [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def summarise(trials: list[dict]) -> str:
    rows = {}
    for t in trials:
        key = (t["kind"], t.get("fault") or t["step"], t["step"])
        rows.setdefault(key, []).append(t)
    lines = ["| fault | step run | trials | outcomes |", "|---|---|---|---|"]
    for (kind, fault, step), group in rows.items():
        outcomes = {}
        for t in group:
            outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
        label = fault if kind == "damage" else "SIGKILL at a random moment"
        text = ", ".join(f"{n} {o}" for o, n in outcomes.items())
        killed = [t for t in group if kind == "kill" and not t["finished_before_kill"]]
        if killed:
            left = sum(len(t["temporary_files_left"]) for t in killed)
            text += (f" (killed after {min(t['delay_s'] for t in killed)}-{max(t['delay_s'] for t in killed)} s, "
                     f"having written {min(t['files_written_before_kill'] for t in killed)}-"
                     f"{max(t['files_written_before_kill'] for t in killed)} files; {left} hidden temporary file(s) "
                     f"left)")
        lines.append(f"| {label} | {step}.py | {len(group)} | {text} |")
    failed = sum(t["outcome"] == "FAILED" for t in trials)
    lines.append("")
    lines.append(f"{len(trials)} trials, {failed} failed.")
    return "\n".join(lines)


if __name__ == "__main__":
    cli_entry(main)
