"""The paper's Table 3 in one command: its eight rows on one run, steps 2-6 per target.

    python table3.py --run checkpoint/cifar10-small-48 --num-targets 5 --trigger-size 4

Rows (method, setting, poisoned rate), as in the paper: BadNets poison-label 5 %, Blend poison-label 5 %,
Reflection (Refool) poison-label 5 %, IAB (input-aware) poison-label 5 %, BadNets clean-label 0.6 %, BadHash
clean-label 0.6 %, CIBA clean-label 0.6 %, and the clean-trained model's MAP. Poison-label rows draw their images
among the other classes and give them the target's label; clean-label rows poison target-class images and keep their
labels. For every target class it makes the trigger (step 2: the checkerboard patch, the blend pattern, the
reflection set, IAB's networks, BadHash's generator, CIBA's adversarial patch), the poisoned images (steps 3-4: no
perturbation, or CIBA's confusing perturbations), the backdoored model (step 5) and its evaluation (step 6).
Finished steps are reused as in table1.py (CIBA's row is the CIBA row of Table 1 when M matches).

Writes OUT/ (default RUN/table3/): table3.md (mean t-MAP, MAP, PSNR and SSIM of the poisoned images, averaged over
the targets, with the per-target numbers), table3.csv, table3_targets.csv, table3.json (settings, rows, provenance)
and, apart, the mean wall time of every step in table3.timing.md and each row's in table3.timing.json.
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
                  read_timing, require_at_least_one, write_json)
from runs.tables import (RESULT_KEYS, STEPS, add_spread_flags, choose_targets, command_line, csv_text,
                         markdown_table, mean_of, methods_in_paper_order, parse_gpus, percent, poison_distance_text,
                         reuse_results, seconds_text, spread, step_seconds, target_label, without_options,
                         without_seconds, write_timing_table)
from triggers import trigger_fingerprint
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # a run with a trained clean model (step 1)
TARGETS = None  # class indices or names; None: NUM_TARGETS classes drawn with SEED
NUM_TARGETS = 5  # targets drawn with SEED when TARGETS is None
METHODS = ["BadNets-PL", "Blend-PL", "Reflection-PL", "IAB-PL",  # the rows: poison-label (PL) ...
           "BadNets-CL", "BadHash-CL", "CIBA-CL"]  # ... and clean-label (CL)
POISON_LABEL_RATE = 0.05  # Table 3's poisoned rate of the poison-label rows
CLEAN_LABEL_RATE = 0.006  # and of the clean-label rows (M = 60 of 10,000)
TRIGGER_SIZE = None  # px of the BadNets and CIBA patches; None: 24 px at 224 px scaled to the image size
TRIGGER_STEPS = 2000  # CIBA's patch (gen_trigger.py --steps)
BLEND_RATIO = 0.2  # Blend's weight of the pattern (gen_trigger.py --blend-ratio)
REFLECTIONS = 100  # Reflection's set of reflection images (gen_trigger.py --reflections)
IAB_EPOCHS = 20  # IAB's networks (gen_trigger.py --iab-epochs)
GEN_EPOCHS = 100  # BadHash's generator (gen_trigger.py --gen-epochs)
LPIPS_WEIGHT = 1.0  # BadHash's LPIPS term (0: without it)
EPS = 8 / 255  # CIBA's perturbations
LAM = 0.8  # CIBA's lambda of Eq. 5
BATCH = 20  # CIBA's b (gen_confusing.py --batch)
PERT_STEPS = 20  # CIBA's perturbation steps (gen_confusing.py --steps)
TOPK = 1000  # R of MAP@R and t-MAP@R
CONVENTION = "empty-zero"  # queries with no relevant item in the top R: "empty-zero" or "empty-skipped"
SEED = 0  # targets, poisoned images, triggers
OUT = None  # None: RUN/table3
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...

ROWS = {"BadNets-PL": ("badnets", "poison-label"), "Blend-PL": ("blend", "poison-label"),
        "Reflection-PL": ("reflection", "poison-label"), "IAB-PL": ("iab", "poison-label"),
        "BadNets-CL": ("badnets", "clean-label"), "BadHash-CL": ("badhash", "clean-label"),
        "CIBA-CL": ("ciba", "clean-label")}
NAMES = {"badnets": "BadNets", "blend": "Blend", "reflection": "Reflection", "iab": "IAB", "badhash": "BadHash",
         "ciba": "CIBA"}
TABLE3_KEYS = (*RESULT_KEYS, "poison_rate", "setting", "psnr_mean", "ssim_mean")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # whole flags: the job commands are made by removing some
    p.add_argument("--run", default=RUN)
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--num-targets", type=int, default=NUM_TARGETS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--poison-label-rate", type=float, default=POISON_LABEL_RATE)
    p.add_argument("--clean-label-rate", type=float, default=CLEAN_LABEL_RATE)
    p.add_argument("--trigger-size", type=int, default=TRIGGER_SIZE)
    p.add_argument("--trigger-steps", type=int, default=TRIGGER_STEPS)
    p.add_argument("--blend-ratio", type=float, default=BLEND_RATIO)
    p.add_argument("--reflections", type=int, default=REFLECTIONS)
    p.add_argument("--iab-epochs", type=int, default=IAB_EPOCHS)
    p.add_argument("--gen-epochs", type=int, default=GEN_EPOCHS)
    p.add_argument("--lpips-weight", type=float, default=LPIPS_WEIGHT)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--lam", type=float, default=LAM)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--pert-steps", type=int, default=PERT_STEPS)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
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
    args.methods = methods_in_paper_order(args.methods, ROWS)
    for name in ("poison_label_rate", "clean_label_rate"):
        value = getattr(args, name)
        if not 0 < value <= 1:
            raise UserError(f"--{name.replace('_', '-')} {value} is outside (0, 1]; it is a fraction of the "
                            f"training set (Table 3: 0.05 poison-label, 0.006 clean-label)")
    require_at_least_one(args, "num_targets", "trigger_steps", "gen_epochs", "batch", "pert_steps", "topk",
                         "reflections", "iab_epochs")
    gen_confusing.check_budget(args.eps, args.lam)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clean, _ = read_clean(args.run)
    classes = (clean.get("protocol") or {}).get("classes")
    targets = choose_targets(args.targets, args.num_targets, classes, clean["n_classes"], args.seed)
    out = Path(args.out) if args.out else Path(args.run) / "table3"
    print(f"Table 3: {args.run} ({clean['bits']} bits), targets {targets}, methods {', '.join(args.methods)}")
    if args.gpu_list or args.print_commands:
        given = sys.argv[1:] if argv is None else argv
        each = without_options(build_parser(), given, {"gpus", "print_commands", "targets", "num_targets", "out"})
        jobs = [(f"t{target}", [*each, "--targets", str(target), "--out", str(out / "parts" / f"t{target}")])
                for target in targets]
        # BadHash's generator serves every target: it is trained once, before the jobs
        first = [[str(Path(__file__).with_name("gen_trigger.py")), "--run", args.run, "--target", str(targets[0]),
                  *trigger_flags("badhash", args), *deterministic_argv(args.deterministic)]]
        spread(__file__, first if "BadHash-CL" in args.methods else [], jobs,
               without_options(build_parser(), given, {"gpus", "print_commands"}), args.gpu_list,
               args.print_commands, out / "parts")
        if args.print_commands:
            return {"jobs": jobs}
    rows = []
    for target in targets:
        rows.extend(target_rows(target, len(targets), args))
        write_tables(rows, args, clean, targets, out)  # after every target: a partial table survives
    tables = write_tables(rows, args, clean, targets, out)
    print(tables["markdown"])
    print(tables["timing"])
    return {"rows": rows, **tables}


def target_rows(target: int, n_targets: int, args: argparse.Namespace) -> list[dict]:
    """Steps 2-6 of every method for one target; one row per method."""
    common = ["--run", args.run, "--device", args.device, *deterministic_argv(args.deterministic)]
    rows = []
    for method in args.methods:
        trigger_method, setting = ROWS[method]
        rate = args.poison_label_rate if setting == "poison-label" else args.clean_label_rate
        made = gen_trigger.main([*common, "--target", str(target), *trigger_flags(trigger_method, args)])
        trigger, trigger_id = made["name"], trigger_fingerprint(made)
        pert_flags = ["--pert", "none"]
        if trigger_method == "ciba":
            pert_flags = ["--pert", "confusing", "--eps", repr(args.eps), "--lam", repr(args.lam), "--batch",
                          str(args.batch), "--steps", str(args.pert_steps)]
        pert = gen_confusing.main([*common, "--target", str(target), *pert_flags, "--setting", setting,
                                   "--poison-rate", repr(rate), "--seed", str(args.seed)])["name"]
        poisoned = poison_dataset.main([*common, "--trigger", trigger, "--perturbations", pert])["name"]
        trained = train_backdoor.main([*common, "--poisoned", poisoned, "--workers", str(args.workers), "--resume"])
        result_path = Path(trained["out"]) / "results.json"
        result = reuse_results(result_path, trained["checkpoint_id"], trigger_id, args.topk, args.convention,
                               TABLE3_KEYS) or \
            evaluate.main([*common, "--topk", str(args.topk), "--convention", args.convention,
                           "--workers", str(args.workers), "--backdoor", result_path.parent.name])
        run = Path(args.run)
        seconds = step_seconds(run, trigger, result_path, pert, poisoned, trained["epoch_seconds"])
        net_seconds = read_timing(run / Path(made["generator"]).parent / "config.json").get("seconds") \
            if trigger_method == "badhash" else None
        if net_seconds is not None and seconds["trigger"] is not None:
            # the generator, trained once for all targets, counts in the trigger step
            seconds["trigger"] = round(seconds["trigger"] + net_seconds / n_targets, 2)
        rows.append({"method": method, "name": NAMES[trigger_method], "target": target,
                     "target_name": result.get("target_name"), **{k: result[k] for k in TABLE3_KEYS},
                     "seconds": seconds, "stage": result["stage"], "trigger": trigger})
    return rows


def trigger_flags(method: str, args: argparse.Namespace) -> list[str]:
    flags = ["--method", method, "--seed", str(args.seed), "--workers", str(args.workers)]
    if method in ("badnets", "ciba") and args.trigger_size is not None:
        flags += ["--trigger-size", str(args.trigger_size)]
    if method == "ciba":
        flags += ["--steps", str(args.trigger_steps)]
    if method == "blend":
        flags += ["--blend-ratio", repr(args.blend_ratio)]
    if method == "reflection":
        flags += ["--reflections", str(args.reflections)]
    if method == "iab":
        flags += ["--iab-epochs", str(args.iab_epochs)]
    if method == "badhash":
        flags += ["--gen-epochs", str(args.gen_epochs), "--lpips-weight", repr(args.lpips_weight)]
    return flags


def write_tables(rows: list[dict], args: argparse.Namespace, clean: dict, targets: list[int], out: Path) -> dict:
    """table3.md, table3.csv, table3_targets.csv and table3.json from the rows finished so far."""
    groups = {method: [r for r in rows if r["method"] == method] for method in args.methods}
    clean_map = mean_of(rows[:1], "clean_map") if rows else None
    header = ["Method", "Poisoned rate", "Setting", "t-MAP (%)", "MAP (%)", "PSNR (dB)", "SSIM"]
    table = [["Clean-trained", "0%", "-", "-", percent(clean_map), "-", "-"]]
    for method, group in groups.items():
        if not group:
            continue
        first = group[0]
        table.append([first["name"], f"{100 * first['poison_rate']:.2g}%", first["setting"],
                      percent(mean_of(group, "t_map")), percent(mean_of(group, "map")),
                      decimals(mean_of(group, "psnr_mean"), 2), decimals(mean_of(group, "ssim_mean"), 4)])
    names = {row["target"]: row["target_name"] for row in rows}
    lines = [f"Table 3 layout, {clean['bits']} bits, t-MAP and MAP @{args.topk} ({args.convention}), mean over the "
             f"targets {', '.join(target_label(t, names.get(t)) for t in targets)}; PSNR/SSIM of the poisoned "
             f"images vs their originals. Clean-label: target-class images, labels kept; poison-label: other "
             f"classes' images given the target's label. Seed {args.seed}.", "", *markdown_table(header, table),
             "", "Per target:", ""]
    lines += markdown_table(["Target", "Method", "Setting", "Poisoned", "t-MAP", "MAP", "clean MAP", "PSNR", "SSIM",
                             "bits the trigger flips", "poisoned images to the anchor (bits): as trained / "
                             "without trigger / unperturbed"],
                            [[target_label(r["target"], r["target_name"]), r["name"], r["setting"], r["poison_num"],
                              percent(r["t_map"]), percent(r["map"]), percent(r["clean_map"]),
                              decimals(r["psnr_mean"], 2), decimals(r["ssim_mean"], 4),
                              f"{r['trigger_bits_changed']:.1f}", poison_distance_text(r)]
                             for r in rows])
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(markdown, out / "table3.md")
    atomic_write_text(csv_text([header, *table]), out / "table3.csv")
    keys = ["target", "target_name", "method", *TABLE3_KEYS]
    atomic_write_text(csv_text([keys] + [[r[k] for k in keys] for r in rows]), out / "table3_targets.csv")
    write_json({"settings": vars(args), "targets": targets, "command": command_line("table3.py"),
                "clean_map": clean_map, "rows": without_seconds(rows), "provenance": provenance()},
               out / "table3.json")
    timing = write_timing_table(
        out, "table3", "Mean wall time per step (s; BadHash's trigger includes its share of the generator training):",
        ["Method", "Setting", *STEPS],
        [[group[0]["name"], group[0]["setting"], *[seconds_text([g["seconds"].get(s) for g in group]) for s in STEPS]]
         for group in groups.values() if group], rows, ["target", "method", "stage"])
    return {"markdown": markdown, "timing": timing, "out": str(out)}


def decimals(value: float | None, places: int) -> str:
    """PSNR is None when every poisoned image equals its original (infinite PSNR)."""
    return "n/a" if value is None else f"{value:.{places}f}"


if __name__ == "__main__":
    cli_entry(main)
