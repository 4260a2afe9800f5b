"""The defense table (the CIBA paper's appendix): every defense of defend.py against every backdoored model given.

    python table_defenses.py --run checkpoint/c100-lite0-48-e100 --backdoors NAME ... --defenses fine-pruning abl dp

For every backdoored model (RUN/backdoor/NAME; default: every one there) and every defense it runs defend.py with
--resume (a finished defense is reused, a killed one continued); flags this script does not know are handed to
defend.py (for example --prune-fraction 0.9, --dp-epochs 20, --isolation-ratio 0.05), and checked before anything
runs. --noise-multipliers gives one DP row per value.

Writes OUT/ (default RUN/defense/table): defenses.md (per attack: t-MAP and MAP without and with each defense, the
clean model's MAP, and the defense's detection figures: ABL's isolated poisoned images with precision, recall and
AUROC, DP's precision at M and AUROC), defenses.csv, defenses.json (settings, rows, provenance) and, apart, the wall
time of every defense in defenses.timing.json. Fine-pruning's curves of every attack in one figure,
pruning-curves.png (t-MAP solid, MAP dashed, one colour per attack) with its data pruning-curves.csv; each defense's
own curve stays in its folder (curve.png, curve.csv).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import defend
import figures
from models.hash_network import read_clean
from runs import UserError, atomic_write_text, cli_entry, pick_output, provenance, write_json
from runs.tables import command_line, csv_text, markdown_table, percent, target_label, without_seconds
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with backdoored models (step 5)
BACKDOORS = None  # folder names under RUN/backdoor/; None: every backdoored model there
DEFENSES = ["fine-pruning", "abl", "dp"]  # fine-pruning, abl, dp
NOISE_MULTIPLIERS = [1.0]  # one DP row per value
OUT = None  # None: RUN/defense/table
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--run", default=RUN)
    p.add_argument("--backdoors", nargs="+", default=BACKDOORS)
    p.add_argument("--defenses", nargs="+", default=DEFENSES, choices=defend.DEFENSES)
    p.add_argument("--noise-multipliers", type=float, nargs="+", default=NOISE_MULTIPLIERS)
    p.add_argument("--out", default=OUT)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    explain_flags(p, __file__)
    args, passed_on = p.parse_known_args(argv)
    for blocked in ("--run", "--backdoor", "--defense", "--noise-multiplier", "--resume", "--overwrite"):
        if any(arg == blocked or arg.startswith(blocked + "=") for arg in passed_on):
            raise UserError(f"{blocked} is set by table_defenses.py itself; give --run, --backdoors, --defenses or "
                            f"--noise-multipliers instead (a defense is redone by deleting its folder under "
                            f"RUN/defense/)")
    defend.parse_args(["--run", args.run, *passed_on])  # defend.py's own checks, before anything runs
    return args, passed_on


def main(argv: list[str] | None = None) -> dict:
    args, passed_on = parse_args(argv)
    run = Path(args.run)
    if args.backdoors is None:
        folder = run / "backdoor"
        args.backdoors = sorted(p.name for p in folder.iterdir() if (p / "codes.pt").is_file()) \
            if folder.is_dir() else []
        if not args.backdoors:
            raise UserError(f"{folder} holds no backdoored model; run train_backdoor.py (or table1.py) first")
    for name in args.backdoors:
        pick_output(run / "backdoor", name, "codes.pt", "train_backdoor.py", "--backdoors")
    classes = (read_clean(run)[0].get("protocol") or {}).get("classes")
    rows, curves = [], []
    for backdoor in args.backdoors:
        for defense in args.defenses:
            for noise in (args.noise_multipliers if defense == "dp" else [None]):
                argv_defend = ["--run", str(run), "--backdoor", backdoor, "--defense", defense, "--resume",
                               "--workers", str(args.workers), "--device", args.device, *passed_on]
                if noise is not None:
                    argv_defend += ["--noise-multiplier", f"{noise:g}"]
                t0 = time.time()
                result = defend.main(argv_defend)
                row = table_row(result, defense)
                row["target_name"] = classes[row["target"]] if classes else None
                rows.append({**row, "seconds": round(time.time() - t0, 2)})
                if defense == "fine-pruning":
                    curves.append((row, result["curve"]))
    out = Path(args.out) if args.out else run / "defense" / "table"
    header, table = table_rows(rows)
    markdown = "\n".join([f"Defenses against the backdoored models of {run}: t-MAP (%) and MAP (%) @"
                          f"{rows[0]['topk']} without and with each defense; clean model MAP "
                          f"{percent(rows[0]['clean_map'])}.", "", *markdown_table(header, table)]) + "\n"
    atomic_write_text(markdown, out / "defenses.md")
    atomic_write_text(csv_text([header, *table]), out / "defenses.csv")
    write_json({"settings": vars(args), "passed_on": passed_on, "command": command_line("table_defenses.py"),
                "rows": without_seconds(rows), "provenance": provenance()}, out / "defenses.json")
    write_json({"rows": [{k: row[k] for k in ("backdoor", "defense", "setting", "seconds")} for row in rows]},
               out / "defenses.timing.json")
    if curves:
        write_pruning_curves(curves, out / "pruning-curves")
    print(markdown)
    return {"rows": rows, "out": str(out)}


def table_row(result: dict, defense: str) -> dict:
    """One row from a defend.py result: the attack, the defense and its setting, scores without and with it, and
    its detection figures (None where the defense detects nothing)."""
    settings = result["settings"]
    if defense == "fine-pruning":
        setting = f"{settings['prune_fraction']:.0%} pruned, {settings['fine_tune_epochs']} epochs fine-tuned"
        detection = None
    elif defense == "abl":
        abl = result["abl"]
        scope = " per class" if abl.get("isolation_scope") == "per-class" else ""
        setting = (f"gamma {abl['gamma']:g}, {abl['isolation_ratio']:.0%}{scope} isolated after "
                   f"{abl['isolation_epochs']} epochs, {abl['unlearn_epochs']} unlearning epochs")
        detection = (f"{result['poisoned_isolated']} of {result['poisoned']} poisoned isolated (precision "
                     f"{result['precision']:.2f}, recall {result['recall']:.2f}, AUROC {format_auroc(result)})")
    else:
        dp = result["dp"]
        setting = f"noise {dp['noise_multiplier']:g}, clip {dp['clip_norm']:g}, {dp['epochs']} epochs"
        detection = (f"{result['poisoned_flagged']} of {result['poisoned']} poisoned among the {result['poisoned']} "
                     f"highest losses (AUROC {format_auroc(result)})")
    return {"backdoor": result["backdoor"], "method": result["method"], "target": result["target"],
            "defense": defense, "setting": setting,
            "undefended": {k: result["undefended"][k] for k in ("map", "t_map")}, "defended": result["defended"],
            "clean_map": result["clean_map"], "detection": detection, "topk": settings["topk"]}


def write_pruning_curves(curves: list[tuple[dict, list[dict]]], stem: Path) -> list[str]:
    """Fine-pruning before fine-tuning, every attack in one figure: t-MAP (solid) and MAP (dashed) in % against the
    fraction of channels pruned, one colour per attack (named by method and target; by its folder where two share
    both); the CSV holds every point."""
    from matplotlib.ticker import AutoLocator
    labels = [f"{row['method']}, {target_label(row['target'], row['target_name'])}" for row, _ in curves]
    labels = [f"{label}: {row['backdoor']}" if labels.count(label) > 1 else label
              for label, (row, _) in zip(labels, curves)]
    figure, axes = figures.new_figure()
    table = [["attack", "backdoor", "fraction", "pruned", "map", "t_map"]]
    for index, (label, (row, points)) in enumerate(zip(labels, curves)):
        fractions = [p["fraction"] for p in points]
        colour = f"C{index % 10}"
        axes.plot(fractions, [100 * p["t_map"] for p in points], "s-", color=colour, label=f"{label}: t-MAP")
        axes.plot(fractions, [100 * p["map"] for p in points], "o--", color=colour, label=f"{label}: MAP")
        table += [[label, row["backdoor"], p["fraction"], p["pruned"], p["map"], p["t_map"]] for p in points]
    axes.xaxis.set_major_locator(AutoLocator())  # fractions, not the integer steps new_figure expects
    axes.set(xlabel="fraction of the last feature map's channels pruned (before fine-tuning)", ylabel="%",
             ylim=(0, 100))
    axes.legend(fontsize=6)
    return figures.save(figure, table, stem)


def format_auroc(result: dict) -> str:
    return "n/a" if result.get("auroc") is None else f"{result['auroc']:.3f}"


def table_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["Attack", "Target", "Defense", "Setting", "t-MAP without", "t-MAP with", "MAP without", "MAP with",
              "Detection"]
    return header, [[row["method"], target_label(row["target"], row["target_name"]), row["defense"], row["setting"],
                     percent(row["undefended"]["t_map"]), percent(row["defended"]["t_map"]),
                     percent(row["undefended"]["map"]), percent(row["defended"]["map"]), row["detection"] or "-"]
                    for row in rows]


if __name__ == "__main__":
    cli_entry(main)
