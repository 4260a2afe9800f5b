"""The paper's figures from a run directory: each a PNG with the data behind it (CSV), under RUN/figures/.

    python figures.py --run checkpoint/cifar10-small-48 --figure theorem1
    python figures.py --run checkpoint/cifar10-small-48 --figure trigger-distance

theorem1: the confusing objective (Eq. 5) of every batch of step 3, step by step, with the bound of Theorem 1 as a
  line (the tight bound of Eq. 4 as written, and dashed the bound as printed in the paper, which counts unordered
  pairs); one figure per perturbation set (--perturbations, default: every one with an objective).
trigger-distance: Figure 2(b), the mean Hamming distance between the code of an image with the trigger and the code
  of the trigger alone, after every epoch of backdoor training, one line per backdoored model (--backdoor, default:
  every one trained with train_backdoor.py --track-trigger-distance N).
samples: the poisoned images of step 4, one row per poisoned set (--poisoned, default: every one): for --samples
  images of each, the original, the poisoned image with its PSNR / SSIM, and the difference amplified --amplify times.

Figures not listed here (Figure 2(a), 4, 5, retrieved images, precision-recall) are not built yet.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from evaluate import method_name
from data.images import open_rgb
from runs import UserError, atomic_path, atomic_write_text, cli_entry, read_json, require_at_least_one
from runs.tables import csv_text

RUN = "checkpoint/demo"
FIGURE = "theorem1"
PERTURBATIONS = None  # folder names under RUN/perturbations/ (theorem1); None: every one with an objective
BACKDOOR = None  # folder names under RUN/backdoor/ (trigger-distance); None: every one that tracked it
POISONED = None  # folder names under RUN/poisoned/ (samples); None: every one
SAMPLES = 4  # images per poisoned set (samples)
AMPLIFY = 10  # factor of the shown |poisoned - original| (samples)
OUT = None  # None: RUN/figures/
FIGURES = ("theorem1", "trigger-distance", "samples")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--figure", default=FIGURE, choices=FIGURES)
    p.add_argument("--perturbations", nargs="+", default=PERTURBATIONS)
    p.add_argument("--backdoor", nargs="+", default=BACKDOOR)
    p.add_argument("--poisoned", nargs="+", default=POISONED)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--amplify", type=float, default=AMPLIFY)
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    require_at_least_one(args, "samples")
    if args.amplify <= 0:
        raise UserError(f"--amplify must be positive, got {args.amplify}")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "clean").is_dir():
        raise UserError(f"{run} holds no run (no clean/ folder); give the --run of train_hash.py")
    out = Path(args.out) if args.out else run / "figures"
    if args.figure == "theorem1":
        made = theorem1(run, args.perturbations, out)
    elif args.figure == "trigger-distance":
        made = trigger_distance(run, args.backdoor, out)
    else:
        made = samples(run, args.poisoned, args.samples, args.amplify, out)
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
        method = method_of(run, config["trigger"], config["perturbations"])
        points = [(h["epoch"], h["trigger_distance"]) for h in read_json(folder / name / "history.json")
                  if "trigger_distance" in h]
        axes.plot(*zip(*points), marker="o", markersize=3, label=f"{method} ({name})")
        rows += [[name, method, epoch, value] for epoch, value in points]
    axes.set(xlabel="epoch of backdoor training", ylabel="mean d_H(code of x + trigger, code of trigger alone)",
             title="Figure 2(b): trigger distance")
    axes.legend(fontsize=7)
    return save(figure, rows, out / "trigger-distance")


def samples(run: Path, names: list[str] | None, count: int, amplify: float, out: Path) -> list[str]:
    """Originals, poisoned images (PSNR / SSIM in the caption) and amplified differences, a row per poisoned set."""
    import numpy as np
    folder = run / "poisoned"
    names = names or sorted(p.parent.name for p in folder.glob("*/config.json"))
    if not names:
        raise UserError(f"{folder} holds no poisoned set; run poison_dataset.py first")
    rows = [["poisoned", "method", "index", "original", "poisoned_image", "psnr", "ssim", "max_abs_change"]]
    figure, grid = new_grid(len(names), 3 * count)
    for r, name in enumerate(names):
        made = read_json(folder / name / "config.json")
        method = method_of(run, made["trigger"], made["perturbations"])
        method += "-PL" if made.get("label_setting") == "poison-label" else ""
        for c, entry in enumerate(read_json(folder / name / "manifest.json")[:count]):
            original, poisoned = (np.asarray(open_rgb(entry[key]), dtype=np.float64) / 255
                                  for key in ("original", "poisoned"))
            if original.shape != poisoned.shape:  # an original larger than the canonical size: show it resized
                original = np.asarray(open_rgb(entry["original"]).resize(poisoned.shape[1::-1]), np.float64) / 255
            change = np.abs(poisoned - original)
            psnr = "inf" if entry["psnr"] is None or not np.isfinite(entry["psnr"]) else f"{entry['psnr']:.1f}"
            for k, (image, caption) in enumerate(((original, f"{method}\noriginal" if c == 0 else "original"),
                                                  (poisoned, f"PSNR {psnr}\nSSIM {entry['ssim']:.3f}"),
                                                  (np.clip(change * amplify, 0, 1), f"|diff| x{amplify:g}"))):
                axes = grid[r][3 * c + k]
                axes.imshow(image)
                axes.set_title(caption, fontsize=6)
            rows.append([name, method, entry["index"], entry["original"], entry["poisoned"], entry["psnr"],
                         entry["ssim"], float(change.max())])
    return save(figure, rows, out / "samples")


def method_of(run: Path, trigger: str, perturbations: str) -> str:
    """The paper's name (Tri, CIBA, BadNets, ...) of the attack made with these step 2 and step 3 outputs."""
    return method_name(read_json(run / "triggers" / trigger / "config.json")["method"],
                       read_json(run / "perturbations" / perturbations / "config.json")["pert"])


def pyplot():
    """matplotlib.pyplot drawing to files only (no display), imported when a figure is made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def new_grid(n_rows: int, n_cols: int):
    figure, grid = pyplot().subplots(n_rows, n_cols, figsize=(1.1 * n_cols, 1.35 * n_rows), dpi=150, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    return figure, grid


def new_figure():
    from matplotlib.ticker import MaxNLocator
    figure, axes = pyplot().subplots(figsize=(6.4, 4.2), dpi=150)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs
    return figure, axes


def save(figure, rows: list[list], stem: Path) -> list[str]:
    """The PNG and the CSV of its data, each written atomically."""
    png, table = (stem.with_name(f"{stem.name}.{kind}") for kind in ("png", "csv"))  # names hold dots (l0.8)
    figure.tight_layout()
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png")
    pyplot().close(figure)
    atomic_write_text(csv_text(rows), table)
    return [str(png), str(table)]


if __name__ == "__main__":
    cli_entry(main)
