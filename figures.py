"""The paper's figures from a run directory: each a PNG with the data behind it (CSV), under RUN/figures/.

    python figures.py --run checkpoint/cifar10-small-48 --figure theorem1
    python figures.py --run checkpoint/cifar10-small-48 --figure trigger-distance

theorem1: the confusing objective (Eq. 5) of every batch of step 3, step by step, with the bound of Theorem 1 as a
  line (the tight bound of Eq. 4 as written, and dashed the bound as printed in the paper, which counts unordered
  pairs); one figure per perturbation set (--perturbations, default: every one with an objective).
trigger-distance: Figure 2(b), the mean Hamming distance between the code of an image with the trigger and the code
  of the trigger alone, after every epoch of backdoor training, one line per backdoored model (--backdoor, default:
  every one trained with train_backdoor.py --track-trigger-distance N).

Figures not listed here (Figure 2(a), 4, 5, the sample grid, precision-recall) are not built yet.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from evaluate import method_name
from runs import UserError, atomic_path, atomic_write_text, cli_entry, read_json
from runs.tables import csv_text

RUN = "checkpoint/demo"
FIGURE = "theorem1"
PERTURBATIONS = None  # folder names under RUN/perturbations/ (theorem1); None: every one with an objective
BACKDOOR = None  # folder names under RUN/backdoor/ (trigger-distance); None: every one that tracked it
OUT = None  # None: RUN/figures/
FIGURES = ("theorem1", "trigger-distance")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--figure", default=FIGURE, choices=FIGURES)
    p.add_argument("--perturbations", nargs="+", default=PERTURBATIONS)
    p.add_argument("--backdoor", nargs="+", default=BACKDOOR)
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "clean").is_dir():
        raise UserError(f"{run} holds no run (no clean/ folder); give the --run of train_hash.py")
    out = Path(args.out) if args.out else run / "figures"
    made = theorem1(run, args.perturbations, out) if args.figure == "theorem1" else \
        trigger_distance(run, args.backdoor, out)
    for path in made:
        print(f"-> {path}")
    return made


def theorem1(run: Path, names: list[str] | None, out: Path) -> list[str]:
    """One figure per perturbation set: the objective of each batch per step, the bounds as horizontal lines."""
    folder = run / "perturbations"
    names = names or sorted(p.parent.name for p in folder.glob("*/history.json") if read_json(p))
    if not names:
        raise UserError(f"{folder} holds no perturbations with an objective; run gen_confusing.py --pert confusing "
                        f"(or adv) first")
    made = []
    for name in names:
        history = read_json(folder / name / "history.json")
        if not history:
            raise UserError(f"{folder / name} has no objective per step (--pert none or noise); choose a confusing "
                            f"or adv set")
        rows = [["batch", "first_image", "batch_size", "step", "objective", "bound", "bound_as_printed"]]
        figure, axes = new_figure()
        for i, batch in enumerate(history):
            axes.plot(range(len(batch["objective"])), batch["objective"], color=f"C{i % 10}",
                      label=f"batch {i + 1} (b = {batch['batch']})")
            rows += [[i, batch["first_image"], batch["batch"], step, value, batch["bound"],
                      batch["theorem1_bound_as_printed"]] for step, value in enumerate(batch["objective"])]
        for bound, style, label in ((history[0]["bound"], "-", "bound (Eq. 4 as written)"),
                                    (history[0]["theorem1_bound_as_printed"], "--", "Theorem 1 as printed")):
            axes.axhline(bound, color="black", linestyle=style, linewidth=1, label=f"{label}: {bound:.2f}")
        axes.set(xlabel="step", ylabel="objective of Eq. 5 (bits)", title=f"confusing objective, {name}")
        axes.legend(fontsize=7)
        made += save(figure, rows, out / f"theorem1-{name}")
    return made


def trigger_distance(run: Path, names: list[str] | None, out: Path) -> list[str]:
    """Figure 2(b): trigger distance per epoch, one line per backdoored model."""
    folder = run / "backdoor"
    tracked = [p.parent.name for p in sorted(folder.glob("*/history.json"))
               if any("trigger_distance" in h for h in read_json(p))]
    names = names or tracked
    if not names:
        raise UserError(f"no backdoored model in {folder} recorded the trigger distance; train them with "
                        f"train_backdoor.py --track-trigger-distance 1000")
    rows = [["backdoor", "method", "epoch", "trigger_distance"]]
    figure, axes = new_figure()
    for name in names:
        if name not in tracked:
            raise UserError(f"{folder / name} did not record the trigger distance (there: {', '.join(tracked)}); "
                            f"train it again with --track-trigger-distance N --overwrite")
        config = read_json(folder / name / "config.json")
        pert = read_json(run / "perturbations" / config["perturbations"] / "config.json")["pert"]
        trigger = read_json(run / "triggers" / config["trigger"] / "config.json")["method"]
        method = method_name(trigger, pert)
        points = [(h["epoch"], h["trigger_distance"]) for h in read_json(folder / name / "history.json")
                  if "trigger_distance" in h]
        axes.plot(*zip(*points), marker="o", markersize=3, label=f"{method} ({name})")
        rows += [[name, method, epoch, value] for epoch, value in points]
    axes.set(xlabel="epoch of backdoor training", ylabel="mean d_H(code of x + trigger, code of trigger alone)",
             title="Figure 2(b): trigger distance")
    axes.legend(fontsize=7)
    return save(figure, rows, out / "trigger-distance")


def new_figure():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs
    return figure, axes


def save(figure, rows: list[list], stem: Path) -> list[str]:
    """The PNG and the CSV of its data, each written atomically."""
    import matplotlib.pyplot as plt
    png, table = (stem.with_name(f"{stem.name}.{kind}") for kind in ("png", "csv"))  # names hold dots (l0.8)
    figure.tight_layout()
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    atomic_write_text(csv_text(rows), table)
    return [str(png), str(table)]


if __name__ == "__main__":
    cli_entry(main)
