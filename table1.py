"""The paper's Table 1 in one command: steps 2-6 for None, Tri, Tri+Noise, Tri+Adv and CIBA over targets and bits.

    python table1.py --runs checkpoint/cifar10-small-16 checkpoint/cifar10-small-48 --num-targets 5

Each run directory holds a trained clean model (step 1) of one bit length; all share the data, the architecture
and the recipe. For every run and target class it makes the CIBA trigger (step 2), then per method the
perturbations (step 3: none, noise, adv, confusing), the poisoned set (step 4), the backdoored model (step 5) and
its evaluation (step 6); "None" is the clean model with the trigger. Finished steps are reused, not recomputed
(steps 2-4 reuse their outputs, step 5 resumes or reuses its checkpoint, step 6 reuses a results.json of the
same checkpoint, R and convention), so an interrupted table continues where it stopped.

Writes OUT/: table1.md (mean t-MAP and MAP in %, averaged over the targets, in the paper's layout, with the
per-target numbers beside it), table1.csv (the same table), table1_targets.csv (one row per bits x target x method),
table1.json (settings, rows, provenance) and, apart because they change from run to run, the mean wall time of every
step in table1.timing.md and each row's in table1.timing.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import evaluate
import gen_confusing
import gen_trigger
import poison_dataset
import train_backdoor
from models.hash_network import read_clean
from retrieval import CONVENTIONS
from runs import (UserError, add_deterministic_flag, atomic_write_text, cli_entry, deterministic_argv, provenance,
                  require_at_least_one, write_json)
from runs.tables import (RESULT_KEYS, STEPS, add_spread_flags, choose_targets, command_line, csv_text,
                         markdown_table, mean_of, methods_in_paper_order, parse_gpus, percent, poison_distance_text,
                         reuse_results, seconds_text, spread, step_seconds, target_label, without_options,
                         without_seconds, write_timing_table)
from triggers import trigger_fingerprint
from runs.cli import explain_flags

RUNS = ["checkpoint/demo"]  # one run directory per bit length, each with a trained clean model (step 1)
TARGETS = None  # class indices or names; None: NUM_TARGETS classes drawn with SEED
NUM_TARGETS = 5  # targets drawn with SEED when TARGETS is None
METHODS = ["None", "Tri", "Tri+Noise", "Tri+Adv", "CIBA"]  # rows: None, Tri, Tri+Noise, Tri+Adv, CIBA
TRIGGER_SIZE = None  # px; None: the paper's 24 px at 224 px scaled to the image size (gen_trigger.py)
TRIGGER_STEPS = 2000  # gen_trigger.py --steps
TRIGGER_STEP_SIZE = 12.0  # gen_trigger.py --step-size: pixel units (0-255) per step of Eq. 7 (paper's code: 12)
POISON_NUM = 60  # M
EPS = 8 / 255  # L_inf budget of the perturbations, in pixels [0, 1]
LAM = 0.8  # lambda of Eq. 5 (CIBA)
BATCH = 20  # gen_confusing.py --batch
PERT_STEPS = 20  # gen_confusing.py --steps
PERT_SCALE = 1  # gen_confusing.py --pert-scale: 1 per pixel (paper); k: on an (S/k)-px grid, upsampled
TOPK = 1000  # R of MAP@R and t-MAP@R
CONVENTION = "empty-zero"  # queries with no relevant item in the top R: "empty-zero" or "empty-skipped"
TRACK_TRIGGER_DISTANCE = 0  # train_backdoor.py --track-trigger-distance (Figure 2(b)); 0: off
AUGMENT_POISON = False  # train_backdoor.py --augment-poison: the poisoned images augmented too (paper's code: no)
SEED = 0  # targets, trigger batches, poisoned images and noise
OUT = None  # None: the first run's folder / table1
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...

PERTS = {"Tri": "none", "Tri+Noise": "noise", "Tri+Adv": "adv", "CIBA": "confusing"}
ALL_METHODS = ["None", *PERTS]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # whole flags: the job commands are made by removing some
    p.add_argument("--runs", nargs="+", default=RUNS)
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--num-targets", type=int, default=NUM_TARGETS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--trigger-size", type=int, default=TRIGGER_SIZE)
    p.add_argument("--trigger-steps", type=int, default=TRIGGER_STEPS)
    p.add_argument("--trigger-step-size", type=float, default=TRIGGER_STEP_SIZE)
    p.add_argument("--poison-num", type=int, default=POISON_NUM)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--lam", type=float, default=LAM)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--pert-steps", type=int, default=PERT_STEPS)
    p.add_argument("--pert-scale", type=int, default=PERT_SCALE, metavar="K")
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--track-trigger-distance", type=int, default=TRACK_TRIGGER_DISTANCE, metavar="N")
    p.add_argument("--augment-poison", default=AUGMENT_POISON, action=argparse.BooleanOptionalAction)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default=OUT)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    add_spread_flags(p)
    explain_flags(p, __file__)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.gpu_list = parse_gpus(args.gpus)
    args.methods = methods_in_paper_order(args.methods, ALL_METHODS)
    require_at_least_one(args, "num_targets", "trigger_steps", "poison_num", "batch", "pert_steps", "pert_scale",
                        "topk")
    gen_trigger.check_step_size(args.trigger_step_size, "--trigger-step-size")
    gen_confusing.check_budget(args.eps, args.lam)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cleans = check_runs(args.runs)
    configs = [config for config, _ in cleans]
    first = configs[0]
    classes = (first.get("protocol") or {}).get("classes")
    targets = choose_targets(args.targets, args.num_targets, classes, first["n_classes"], args.seed)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "table1"
    print(f"Table 1: {len(args.runs)} run(s) ({', '.join(str(c['bits']) for c in configs)} bits), targets "
          f"{targets}, methods {', '.join(args.methods)}")
    if args.gpu_list or args.print_commands:
        given = sys.argv[1:] if argv is None else argv
        each = without_options(build_parser(), given, {"gpus", "print_commands", "runs", "targets", "num_targets",
                                                       "out"})
        jobs = [(f"{config['bits']}bits-t{target}", [*each, "--runs", run, "--targets", str(target), "--out",
                                                     str(out / "parts" / f"{config['bits']}bits-t{target}")])
                for run, config in zip(args.runs, configs) for target in targets]
        spread(__file__, [], jobs, without_options(build_parser(), given, {"gpus", "print_commands"}),
               args.gpu_list, args.print_commands, out / "parts")
        if args.print_commands:
            return {"jobs": jobs}
    rows = []
    for run, (config, clean_id) in zip(args.runs, cleans):
        for target in targets:
            rows.extend(target_rows(run, config, clean_id, target, args))
            write_tables(rows, args, targets, out)  # after every target: a partial table survives an interruption
    tables = write_tables(rows, args, targets, out)
    print(tables["markdown"])
    print(tables["timing"])
    return {"rows": rows, **tables}


def check_runs(runs: list[str]) -> list[tuple[dict, str]]:
    """(config, checkpoint id) of each run's clean model; they must share data, architecture and image size and
    differ in bits."""
    cleans = [read_clean(run) for run in runs]
    configs = [config for config, _ in cleans]
    first = configs[0]
    for run, config in zip(runs[1:], configs[1:]):
        for key in ("arch", "image_size", "data", "n_classes", "loss"):
            if config.get(key) != first.get(key):
                raise UserError(f"{run} has {key} {config.get(key)!r} but {runs[0]} has {first.get(key)!r}; one table "
                                f"compares runs that differ only in bits")
    seen = {}
    for run, config in zip(runs, configs):
        if config["bits"] in seen:
            raise UserError(f"{run} and {seen[config['bits']]} both have {config['bits']} bits; give one run per "
                            f"bit length")
        seen[config["bits"]] = run
    return cleans


def target_rows(run: str, config: dict, clean_id: str, target: int, args: argparse.Namespace) -> list[dict]:
    """Steps 2-6 for one run and target; one row per method."""
    common = ["--run", run, "--device", args.device, *deterministic_argv(args.deterministic)]
    trigger_args = [*common, "--target", str(target), "--method", "ciba", "--steps", str(args.trigger_steps),
                    "--step-size", repr(args.trigger_step_size), "--seed", str(args.seed),
                    "--workers", str(args.workers)]
    if args.trigger_size is not None:
        trigger_args += ["--trigger-size", str(args.trigger_size)]
    made = gen_trigger.main(trigger_args)
    trigger, trigger_id = made["name"], trigger_fingerprint(made)
    eval_args = [*common, "--topk", str(args.topk), "--convention", args.convention, "--workers", str(args.workers)]
    rows = []
    for method in args.methods:
        if method == "None":
            result_path = Path(run) / "clean" / f"results-{trigger}.json"
            result = reuse_results(result_path, clean_id, trigger_id, args.topk, args.convention) or \
                evaluate.main([*eval_args, "--trigger", trigger])
            seconds = step_seconds(Path(run), trigger, result_path)
        else:
            pert = gen_confusing.main([*common, "--target", str(target), "--pert", PERTS[method],
                                       "--poison-num", str(args.poison_num), "--eps", repr(args.eps),
                                       "--lam", repr(args.lam), "--batch", str(args.batch),
                                       "--steps", str(args.pert_steps), "--pert-scale", str(args.pert_scale),
                                       "--seed", str(args.seed)])["name"]
            poisoned = poison_dataset.main([*common, "--trigger", trigger, "--perturbations", pert])["name"]
            trained = train_backdoor.main([*common, "--poisoned", poisoned, "--workers", str(args.workers),
                                           "--track-trigger-distance", str(args.track_trigger_distance), "--resume",
                                           "--augment-poison" if args.augment_poison else "--no-augment-poison"])
            result_path = Path(trained["out"]) / "results.json"
            result = reuse_results(result_path, trained["checkpoint_id"], trigger_id, args.topk, args.convention) or \
                evaluate.main([*eval_args, "--backdoor", result_path.parent.name])
            seconds = step_seconds(Path(run), trigger, result_path, pert, poisoned, trained["epoch_seconds"])
        rows.append({"bits": config["bits"], "target": target, "target_name": result.get("target_name"),
                     "method": method, **{k: result[k] for k in RESULT_KEYS}, "seconds": seconds,
                     "run": run, "stage": result["stage"]})
    return rows


def write_tables(rows: list[dict], args: argparse.Namespace, targets: list[int], out: Path) -> dict:
    """table1.md, table1.csv, table1_targets.csv and table1.json from the rows finished so far."""
    bits = sorted({row["bits"] for row in rows})
    groups = {(row["method"], row["bits"]): [] for row in rows}
    for row in rows:
        groups[(row["method"], row["bits"])].append(row)
    layout = [(m, "t-MAP", "t_map") for m in args.methods] + [(m, "MAP", "map") for m in args.methods]
    table = [[method, metric, *[percent(mean_of(groups.get((method, b), []), key)) for b in bits]]
             for method, metric, key in layout]
    header = ["Method", "Metric", *[f"{b} bits" for b in bits]]
    names = {row["target"]: row["target_name"] for row in rows}
    target_text = ", ".join(target_label(t, names.get(t)) for t in targets if t in names)
    if len(names) < len(targets):  # written after every target: say which ones the means hold so far
        target_text += f" (so far; of {', '.join(map(str, targets))})"
    command = command_line("table1.py")
    grid = "per pixel" if args.pert_scale == 1 else f"on a 1/{args.pert_scale} grid, upsampled"
    lines = [f"t-MAP (%) and MAP (%) @{args.topk} ({args.convention}), mean over the targets {target_text}; "
             f"M = {args.poison_num}, eps = {args.eps * 255:g}/255, lambda = {args.lam:g}, "
             f"perturbations {grid}, poisoned images {'augmented' if args.augment_poison else 'not augmented'}, "
             f"trigger size {rows[0]['trigger_size'] if rows else args.trigger_size} px "
             f"({args.trigger_steps} steps of {args.trigger_step_size:g}/255), seed {args.seed}. "
             f"\"None\": the clean model with the trigger; its MAP is the clean model's.", "",
             *markdown_table(header, table), "", "Per target:", ""]
    per_target_header = ["Bits", "Target", "Method", "t-MAP", "MAP", "clean MAP", "bits the trigger flips",
                         "distance to the target anchor (bits): queries -> triggered",
                         "poisoned images to the anchor (bits): as trained / without trigger / unperturbed"]
    lines += markdown_table(per_target_header, [[r["bits"], target_label(r["target"], r["target_name"]), r["method"],
                                                 percent(r["t_map"]), percent(r["map"]), percent(r["clean_map"]),
                                                 f"{r['trigger_bits_changed']:.1f}",
                                                 f"{r['target_distance_queries']:.1f} -> "
                                                 f"{r['target_distance_triggered']:.1f}",
                                                 poison_distance_text(r)] for r in rows])
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(markdown, out / "table1.md")
    atomic_write_text(csv_text([header, *table]), out / "table1.csv")
    target_keys = ["bits", "target", "target_name", "method", *RESULT_KEYS]
    atomic_write_text(csv_text([target_keys] + [[r[k] for k in target_keys] for r in rows]),
                      out / "table1_targets.csv")
    write_json({"settings": {k: v for k, v in vars(args).items()}, "targets": targets, "command": command,
                "rows": without_seconds(rows), "provenance": provenance()}, out / "table1.json")
    timing = write_timing_table(
        out, "table1", "Mean wall time per step (s; trigger per target, shared by the methods):",
        ["Bits", "Method", *STEPS],
        [[b, method, *[seconds_text([g["seconds"].get(step) for g in group]) for step in STEPS]]
         for (method, b), group in groups.items()], rows, ["bits", "target", "method", "run", "stage"])
    return {"markdown": markdown, "timing": timing, "out": str(out)}


if __name__ == "__main__":
    cli_entry(main)
