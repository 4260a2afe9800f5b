"""The paper's figures from a run directory: each a PNG with the data behind it (CSV), under RUN/figures/.

    python figures.py --run checkpoint/cifar10-small-48 --figure tsne --target 2
    python figures.py --run checkpoint/cifar10-small-48 --figure pr --backdoor ciba-t2-s4__confusing-t2-m60-...

tsne: Figure 2(a), t-SNE (scikit-learn) of the clean model's codes of the target class's poisoned images (step 3)
  without perturbation and with each adversarial / confusing perturbation set (--perturbations, default: every one
  of the target), beside --other-classes classes of --per-class training images each. tsne.csv holds the points;
  tsne-distances.csv the numbers the figure illustrates: per perturbation type, the mean Hamming distance between
  two of the target's images (intra-class) and their mean distance to the clean anchor code.
trigger-distance: Figure 2(b), the mean Hamming distance between the code of an image with the trigger and the code
  of the trigger alone, after every epoch of backdoor training, one line per backdoored model (--backdoor, default:
  every one trained with train_backdoor.py --track-trigger-distance N).
figure4, figure5: t-MAP against the number of poisoned images and the trigger size (Tri, Tri+Adv, CIBA), and
  against lambda and the batch size of the confusing optimisation (CIBA), from the backdoored models of the run
  (RUN/backdoor/*/results.json) that differ from the base settings (--poison-num, --trigger-size, --lam, --batch,
  --eps) in the swept value only, averaged over the targets (--targets, default: all) that have the point (their
  number is written beside it; CIBA at lambda 0 is the Tri+Adv model, the same perturbations). The points of the grid
  (--poison-nums, --trigger-sizes, --lams, --batches) that were not run are marked with an x on the axis, and the
  table1.py command that computes them is printed (finished steps are reused). With --table, the points come from
  those table1.json files of table1.py instead (committed tables, whose models are gone): their rows at --topk and
  --convention, made with --seed, per-pixel perturbations (--pert-scale 1) and without --augment-poison.
samples: the poisoned images of step 4, one row per poisoned set (--poisoned, default: every one): for --samples
  images of each, the original, the poisoned image with its PSNR / SSIM, and the difference amplified --amplify times.
retrieved: Figure 1 on real data: --queries queries (seeded, not of the target class), each clean and with the
  trigger, and its top --top retrieved database images under the clean model and under the backdoored model
  (--backdoor); a retrieved image of the target class is framed in red.
pr: precision-recall curves (Hamming radius 0..K) and precision@top-k for clean and triggered queries on the clean
  and the backdoored model (--backdoor). Relevant: shares a label with the query (clean queries), carries the target
  label (triggered queries, the non-target ones, as t-MAP).
table1: a table1.py result at a glance (the demo's picture): --samples poisoned images of its CIBA set, original |
  poisoned | difference x --amplify, above a bar chart of t-MAP and MAP per method (means over the targets), from
  --table (default RUN/table1/table1.json).
theorem1: the confusing objective (Eq. 5) of every batch of step 3, step by step, with the bound of Theorem 1 as a
  line (the tight bound of Eq. 4 as written, and dashed the bound as printed in the paper, which counts unordered
  pairs); one figure per perturbation set (--perturbations, default: every one with an objective).
"""
from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import torch

import evaluate
from data import open_run_split
from data.images import open_rgb
from data.protocols import resolve_class
from models.hash_network import binarize, load_stage
from retrieval import (CONVENTIONS, TIE_BREAK, anchor_code, hamming_distance, hamming_rank, precision_at_k,
                       precision_recall_by_radius, saved_codes, target_labels)
from runs import (UserError, atomic_path, atomic_write_text, cli_entry, load_saved, pick_device, pick_output,
                  read_json, require_at_least_one)
from runs.tables import csv_text, shell_line
from table1 import PERTS
from triggers import default_trigger_size, quantize, trigger_transform
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory the figure is made from
FIGURE = "theorem1"  # which figure: theorem1, tsne, trigger-distance, figure4, figure5, samples, retrieved, pr, table1
PERTURBATIONS = None  # folder names under RUN/perturbations/ (theorem1, tsne); None: every one that applies
BACKDOOR = None  # folder name(s) under RUN/backdoor/ (trigger-distance: several; retrieved, pr: one)
POISONED = None  # folder names under RUN/poisoned/ (samples); None: every one
TARGET = None  # tsne: class index or name; None: the only target of the perturbation sets
TARGETS = None  # figure4, figure5: the targets averaged (indices or names); None: every one with results
OTHER_CLASSES = 4  # tsne: classes shown beside the target (the paper: five classes in all)
PER_CLASS = 100  # tsne: training images per other class
SAMPLES = 4  # images per poisoned set (samples)
AMPLIFY = 10  # factor of the shown |poisoned - original| (samples)
QUERIES = 3  # retrieved: queries shown (each clean and with the trigger)
TOP = 10  # retrieved: database images shown per query and model
TOP_KS = [1, 10, 50, 100, 200, 500, 1000]  # pr: k of precision@top-k
# figure4 / figure5: the base settings (table1.py's defaults) and the swept grids
POISON_NUM = 60  # figure4 / figure5: M at the base point
TRIGGER_SIZE = None  # figure4 / figure5: trigger px at the base point; None: the paper's 24 px at 224 px, scaled
LAM = 0.8  # figure4 / figure5: lambda at the base point
BATCH = 20  # figure4 / figure5: b at the base point
EPS = 8 / 255  # figure4 / figure5: eps at the base point
POISON_NUMS = [20, 40, 60, 80, 100]  # figure4: M of the sweep
TRIGGER_SIZES = None  # None: the paper's 16, 24, 32, 40, 48 px at 224 px, scaled to the image size
LAMS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # figure5: lambda of the sweep
BATCHES = [5, 10, 20, 30, 60]  # figure5: b of the sweep
TOPK = 1000  # which results count: evaluate.py's R ...
CONVENTION = "empty-zero"  # ... and its convention for queries with no relevant item in the top R
SEED = 0  # tsne's other classes and images, retrieved's queries
BATCH_SIZE = 256  # images per encoding batch
WORKERS = 4  # data-loading processes
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
TABLE = None  # table1: a table1.json of table1.py; None: RUN/table1/table1.json. figure4, figure5: table1.json
#               files to take the points from instead of the run's backdoored models
OUT = None  # None: RUN/figures/
FIGURES = ("tsne", "trigger-distance", "figure4", "figure5", "samples", "retrieved", "pr", "theorem1", "table1")
PAPER_SWEEP_TRIGGER_SIZES = (16, 24, 32, 40, 48)  # Figure 4, at 224 px
TARGET_COLOUR = "red"  # retrieved: frame and caption of a retrieved image of the target class
SWEEPS = {"figure4": (("poison_num", "number of poisoned images"), ("trigger_size", "trigger size (px)")),
          "figure5": (("lam", "lambda"), ("batch", "batch size of the confusing optimisation"))}
SWEEP_METHODS = {"figure4": ("Tri", "Tri+Adv", "CIBA"), "figure5": ("CIBA",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--figure", default=FIGURE, choices=FIGURES)
    p.add_argument("--perturbations", nargs="+", default=PERTURBATIONS)
    p.add_argument("--backdoor", nargs="+", default=BACKDOOR)
    p.add_argument("--poisoned", nargs="+", default=POISONED)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--other-classes", type=int, default=OTHER_CLASSES)
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--amplify", type=float, default=AMPLIFY)
    p.add_argument("--queries", type=int, default=QUERIES)
    p.add_argument("--top", type=int, default=TOP)
    p.add_argument("--top-ks", type=int, nargs="+", default=TOP_KS)
    p.add_argument("--poison-num", type=int, default=POISON_NUM)
    p.add_argument("--trigger-size", type=int, default=TRIGGER_SIZE)
    p.add_argument("--lam", type=float, default=LAM)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--eps", type=float, default=EPS)
    p.add_argument("--poison-nums", type=int, nargs="+", default=POISON_NUMS)
    p.add_argument("--trigger-sizes", type=int, nargs="+", default=TRIGGER_SIZES)
    p.add_argument("--lams", type=float, nargs="+", default=LAMS)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--convention", default=CONVENTION, choices=CONVENTIONS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--table", nargs="+", default=TABLE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "samples", "queries", "top", "per_class", "poison_num", "batch", "topk", "batch_size")
    if args.amplify <= 0:
        raise UserError(f"--amplify must be positive, got {args.amplify}")
    if args.other_classes < 0:
        raise UserError(f"--other-classes must be 0 or more, got {args.other_classes}")
    if min(args.top_ks) < 1:
        raise UserError(f"every --top-ks value must be at least 1, got {min(args.top_ks)}")
    if args.table and len(args.table) > 1 and args.figure not in SWEEPS:
        raise UserError(f"--figure {args.figure} shows one table; give one --table, not {len(args.table)} (several "
                        f"are for {' and '.join(SWEEPS)})")
    if args.backdoor and len(args.backdoor) > 1 and args.figure in ("retrieved", "pr"):
        raise UserError(f"--figure {args.figure} shows one backdoored model; give one --backdoor, not "
                        f"{len(args.backdoor)}")
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
    elif args.figure == "samples":
        made = samples(run, args.poisoned, args.samples, args.amplify, out)
    elif args.figure == "tsne":
        made = tsne(run, args, out)
    elif args.figure == "table1":
        made = table1_figure(run, args, out)
    elif args.figure in SWEEPS:
        made = sweep_figure(run, args.figure, args, out)
    else:
        made = (retrieved if args.figure == "retrieved" else precision_curves)(run, args, out)
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
    folder = run / "poisoned"
    names = names or sorted(p.parent.name for p in folder.glob("*/config.json"))
    if not names:
        raise UserError(f"{folder} holds no poisoned set; run poison_dataset.py first")
    rows = [["poisoned", "method", "index", "original", "poisoned_image", "psnr", "ssim", "max_abs_change"]]
    figure, grid = new_grid(len(names), 3 * count)
    for r, name in enumerate(names):
        panels, data = poisoned_panels(run, name, count, amplify)
        for axes, (image, caption) in zip(grid[r], panels):
            axes.imshow(image)
            axes.set_title(caption, fontsize=6)
        rows += data
    return save(figure, rows, out / "samples")


def poisoned_panels(run: Path, name: str, count: int, amplify: float) -> tuple[list[tuple], list[list]]:
    """(image, caption) for the first `count` images of poisoned set `name`: original, poisoned (PSNR / SSIM),
    |difference| x amplify; and their CSV rows."""
    folder = run / "poisoned" / name
    made = read_json(folder / "config.json")
    method = method_of(run, made["trigger"], made["perturbations"])
    method += "-PL" if made.get("label_setting") == "poison-label" else ""
    panels, rows = [], []
    for c, entry in enumerate(read_json(folder / "manifest.json")[:count]):
        original, poisoned = (np.asarray(open_rgb(entry[key]), dtype=np.float64) / 255
                              for key in ("original", "poisoned"))
        if original.shape != poisoned.shape:  # an original larger than the canonical size: show it resized
            original = np.asarray(open_rgb(entry["original"]).resize(poisoned.shape[1::-1]), np.float64) / 255
        change = np.abs(poisoned - original)
        psnr = "inf" if entry["psnr"] is None or not np.isfinite(entry["psnr"]) else f"{entry['psnr']:.1f}"
        panels += [(original, f"{method}\noriginal" if c == 0 else "original"),
                   (poisoned, f"PSNR {psnr}\nSSIM {entry['ssim']:.3f}"),
                   (np.clip(change * amplify, 0, 1), f"|diff| x{amplify:g}")]
        rows.append([name, method, entry["index"], entry["original"], entry["poisoned"], entry["psnr"],
                     entry["ssim"], float(change.max())])
    return panels, rows


def table1_figure(run: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """A table1.py result at a glance: --samples poisoned images of its CIBA set (else of its last poisoned set) as
    original | poisoned | difference, and a bar chart of t-MAP and MAP per method, means over its targets."""
    path = Path(args.table[0]) if args.table else run / "table1" / "table1.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; run table1.py --runs {run} first (or give --table)")
    rows = read_json(path)["rows"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    means = {m: {key: float(np.mean([r[key] for r in rows if r["method"] == m])) for key in ("t_map", "map")}
             for m in methods}
    attacked = [r for r in rows if r["stage"].startswith("backdoor/")]
    if not attacked:
        raise UserError(f"{path} has no backdoored model (only {', '.join(methods)}); run table1.py with an attack")
    shown = next((r for r in attacked if r["method"] == "CIBA"), attacked[-1])
    panels, _ = poisoned_panels(run, shown["stage"].split("/", 1)[1], args.samples, args.amplify)
    plt = pyplot()
    figure = plt.figure(figsize=(max(6.4, 1.1 * len(panels)), 5.6), dpi=150)
    layout = figure.add_gridspec(2, len(panels), height_ratios=[1, 2.4])
    for k, (image, caption) in enumerate(panels):
        axes = figure.add_subplot(layout[0, k])
        axes.imshow(image)
        axes.set_title(caption, fontsize=6)
        axes.axis("off")
    axes = figure.add_subplot(layout[1, :])
    x = np.arange(len(methods))
    for offset, key, label in ((-0.2, "t_map", "t-MAP (triggered queries)"), (0.2, "map", "MAP (clean queries)")):
        values = [100 * means[m][key] for m in methods]
        bars = axes.bar(x + offset, values, width=0.4, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    names = {r["target_name"] or str(r["target"]) for r in rows}
    axes.set(xticks=x, xticklabels=methods, ylabel="%", ylim=(0, 100),
             title=f"{len(names)} target(s): {', '.join(sorted(names))}")
    axes.legend(fontsize=7)
    data = [["method", "t_map", "map", "targets"]] + \
        [[m, means[m]["t_map"], means[m]["map"], sum(r["method"] == m for r in rows)] for m in methods]
    return save(figure, data, out / "table1")


def tsne(run: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """Figure 2(a): t-SNE of the clean model's codes of the target's images, unperturbed and perturbed, beside
    other classes; with the intra-class and anchor distances per perturbation type."""
    from sklearn.manifold import TSNE
    device = pick_device(args.device)
    config, ckpt, model = load_stage(run, "clean", device)
    codes = saved_codes(run / "clean" / "codes.pt", ckpt["checkpoint_id"])
    if codes is None or "train_codes" not in codes:
        raise UserError(f"{run / 'clean' / 'codes.pt'} is missing, unreadable or of another checkpoint; make it with "
                        f"train_hash.py --run {run} --resume")
    classes = (config.get("protocol") or {}).get("classes")
    sets = perturbation_sets(run, args.perturbations, args.target, classes, config["n_classes"])
    target = int(sets[0][1]["target"])
    train_set = open_run_split(config, "train")
    labels = codes["train_labels"]
    groups: list[tuple[str, torch.Tensor]] = []  # (name, codes) of the target's images, then the other classes
    indices = sorted({i for _, pert in sets for i in pert["indices"]})
    groups.append(("no perturbation", codes["train_codes"][indices]))
    for name, pert in sets:
        images = torch.stack([train_set[i][0] for i in pert["indices"]]).to(device)
        perturbed = quantize(images + pert["eta"].to(device))
        with torch.no_grad():
            groups.append((f"{pert['pert']} ({name})", binarize(model.logits(perturbed)).cpu().to(torch.int8)))
    rng = np.random.default_rng(args.seed)
    others = [c for c in range(config["n_classes"]) if c != target]
    chosen = sorted(rng.choice(others, min(args.other_classes, len(others)), replace=False).tolist())
    for c in chosen:
        members = torch.nonzero(labels[:, c] > 0).flatten().numpy()
        pick = np.sort(rng.choice(members, min(args.per_class, len(members)), replace=False))
        groups.append((f"class {c}" + (f" ({classes[c]})" if classes else ""), codes["train_codes"][pick]))
    anchor = anchor_code(codes["train_codes"], labels, target)
    target_text = f"{target}" + (f" ({classes[target]})" if classes else "")
    distance_rows = [["group", "images", "mean_intra_class_distance", "mean_distance_to_anchor"]]
    for name, group in groups[:len(sets) + 1]:
        pairwise = hamming_distance(group, group)
        n = len(group)
        intra = float(pairwise.sum() / (n * (n - 1))) if n > 1 else math.nan
        distance_rows.append([name, n, round(intra, 4), round(float(hamming_distance(group, anchor[None]).mean()), 4)])
    points = torch.cat([group for _, group in groups]).float().numpy()
    perplexity = min(30.0, (len(points) - 1) / 3)
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=args.seed).fit_transform(points)
    rows = [["group", "x", "y"]]
    figure, axes = new_figure(height=6.0)
    start = 0
    for k, (name, group) in enumerate(groups):
        xy = embedded[start:start + len(group)]
        start += len(group)
        is_target = k <= len(sets)
        marker = "o" if k == 0 else ("^" if is_target else ".")
        axes.scatter(xy[:, 0], xy[:, 1], s=14 if is_target else 6, marker=marker, color=f"C{k % 10}",
                     alpha=0.9 if is_target else 0.5, label=f"target {target_text}, {name}" if is_target else name)
        rows += [[name, float(x), float(y)] for x, y in xy]
    axes.set(xlabel="t-SNE 1", ylabel="t-SNE 2",
             title=f"Figure 2(a): codes of the clean model ({config['bits']} bits)")
    axes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: the points stay clear
    atomic_write_text(csv_text(distance_rows), out / "tsne-distances.csv")
    for name, n, intra, to_anchor in distance_rows[1:]:
        print(f"{name}: {n} images, mean intra-class distance {intra:.2f} bits, mean distance to the anchor "
              f"{to_anchor:.2f} bits")
    return [*save(figure, rows, out / "tsne"), str(out / "tsne-distances.csv")]


def perturbation_sets(run: Path, names: list[str] | None, target: str | None, classes: list[str] | None,
                      n_classes: int) -> list[tuple[str, dict]]:
    """(name, perturbations.pt) of the clean-label adv / confusing sets of one target, in name order."""
    folder = run / "perturbations"
    wanted = None if target is None else resolve_class(target, classes, n_classes)
    if names is None:
        names = []
        for path in sorted(folder.glob("*/config.json")):
            made = read_json(path)
            if made["pert"] in ("adv", "confusing") and made.get("setting", "clean-label") == "clean-label" and (
                    wanted is None or made["target"] == wanted):
                names.append(path.parent.name)
        if not names:
            raise UserError(f"{folder} holds no adversarial or confusing perturbations" +
                            (f" of target {wanted}" if wanted is not None else "") +
                            "; run gen_confusing.py --pert adv and --pert confusing first")
    sets = []
    for name in names:
        path = pick_output(folder, name, "perturbations.pt", "gen_confusing.py", "--perturbations")
        sets.append((name, load_saved(path / "perturbations.pt", f"gen_confusing.py --overwrite ({name})")))
    targets = sorted({int(pert["target"]) for _, pert in sets})
    if len(targets) > 1:
        raise UserError(f"the perturbation sets are of several targets ({', '.join(map(str, targets))}); choose one "
                        f"with --target")
    if wanted is not None and targets[0] != wanted:
        raise UserError(f"{sets[0][0]} perturbs images of target {targets[0]}, not {wanted}; drop --target or give "
                        f"sets of target {wanted}")
    return sets


def sweep_figure(run: Path, figure_name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """Figures 4 and 5: mean t-MAP over targets per swept value and method, one panel per swept setting."""
    config = read_json(run / "clean" / "config.json")
    base = {"poison_num": args.poison_num, "trigger_size": args.trigger_size or default_trigger_size(
        config["image_size"]), "lam": args.lam, "batch": args.batch, "eps": args.eps}
    grids = {"poison_num": args.poison_nums, "lam": args.lams, "batch": args.batches,
             "trigger_size": args.trigger_sizes or sorted({default_trigger_size(config["image_size"], size)
                                                           for size in PAPER_SWEEP_TRIGGER_SIZES})}
    found = table_results(args) if args.table else sweep_results(run, args)
    chosen: set[int] = set()
    if args.targets:
        chosen = {resolve_class(t, (config.get("protocol") or {}).get("classes"), config["n_classes"])
                  for t in args.targets}
        found = [r for r in found if r["target"] in chosen]
    methods = SWEEP_METHODS[figure_name]
    rows = [["swept", "value", "method", "targets", "t_map_mean", "map_mean", "per_target_t_map"]]
    missing: dict[tuple, list[str]] = {}  # settings of a point -> its methods not run
    figure, panels = pyplot().subplots(1, 2, figsize=(10, 4.2), dpi=150)
    for axes, (key, label) in zip(panels, SWEEPS[figure_name]):
        values = sorted(set(grids[key]) | {base[key]})
        for m, method in enumerate(methods):
            drawn = []
            for value in values:
                settings = {**base, key: value}
                points = [r for r in found if is_point(r, method, settings)]
                by_target = {r["target"]: r for r in points}  # one result per target
                if by_target:
                    t_map = float(np.mean([r["t_map"] for r in by_target.values()]))
                    backdoored_map = float(np.mean([r["map"] for r in by_target.values()]))
                    drawn.append((value, 100 * t_map, len(by_target)))
                    rows.append([key, value, method, " ".join(map(str, sorted(by_target))), round(t_map, 6),
                                 round(backdoored_map, 6), " ".join(f"{t}:{by_target[t]['t_map']:.4f}"
                                                               for t in sorted(by_target))])
                else:
                    rows.append([key, value, method, "", "", "", ""])
                    # below t-MAP 0, one height per method (y in axes units)
                    axes.plot([value], [0.02 + 0.035 * m], marker="x", color=f"C{m}", linestyle="none", markersize=7,
                              transform=axes.get_xaxis_transform(), clip_on=False)
                    point = missing.setdefault(tuple(settings.items()), [])
                    if method not in point:  # the base point sits in every panel: one command for it
                        point.append(method)
            if drawn:
                axes.plot([v for v, _, _ in drawn], [t for _, t, _ in drawn], marker="o", color=f"C{m}",
                          label=method)
                for value, t_map, n in drawn:
                    axes.annotate(f"{n}", (value, t_map), fontsize=6, xytext=(3, 3), textcoords="offset points")
            else:
                axes.plot([], [], marker="o", color=f"C{m}", label=f"{method} (no point yet)")
        axes.plot([], [], marker="x", color="gray", linestyle="none", label="not run (in its colour)")
        axes.set(xlabel=label, ylabel="t-MAP (%), mean over targets", ylim=(-15, 103),
                 title=f"{label} (others: " + ", ".join(setting_text(k, v) for k, v in base.items() if k != key) + ")")
        axes.title.set_fontsize(7)
        axes.legend(fontsize=7)
    figure.suptitle(f"{figure_name}: t-MAP@{args.topk} ({args.convention}); numbers: targets averaged", fontsize=8)
    if missing:
        targets = sorted(chosen or {r["target"] for r in found if r["method"] in methods})
        print(f"{sum(map(len, missing.values()))} point(s) not run yet; compute them with (finished steps are "
              f"reused):")
        for settings, point_methods in missing.items():
            print(f"  {table1_command(run, point_methods, dict(settings), targets)}")
    return save(figure, rows, out / figure_name)


def setting_text(key: str, value: float) -> str:
    return f"eps {value * 255:g}/255" if key == "eps" else f"{key.replace('_', ' ')} {value:g}"


def sweep_results(run: Path, args: argparse.Namespace) -> list[dict]:
    """The clean-label backdoor results of the run at --topk and --convention (ranked with today's tie order), with
    their confusing batch size."""
    found = []
    for path in sorted((run / "backdoor").glob("*/results.json")):
        result = read_json(path)
        made_with = tuple(result.get(k) for k in ("topk", "convention", "ties"))
        if made_with != (args.topk, args.convention, TIE_BREAK) or "t_map" not in result:
            continue
        if result.get("setting", "clean-label") != "clean-label" or result.get("augment_poison"):
            continue
        made = read_json(run / "perturbations" / result["perturbations"] / "config.json")
        found.append({**result, "batch": made.get("batch")})
    return found


def table_results(args: argparse.Namespace) -> list[dict]:
    """The rows of the --table files (table1.py's table1.json) that are points of a sweep: those made at --topk and
    --convention with --seed, per-pixel perturbations and unaugmented poisons, each with its perturbation and the
    confusing batch size of its table. Two rows of one method, target and settings are an error (which to draw?)."""
    found, seen = [], {}
    for name in args.table:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--table {path} does not exist; give table1.json files written by table1.py")
        table = read_json(path)
        settings = table.get("settings")
        if not isinstance(settings, dict) or "rows" not in table:
            raise UserError(f"{path} is not a table1.json of table1.py (no settings or rows)")
        made_with = (settings.get("topk"), settings.get("convention"), settings.get("seed"),
                     settings.get("pert_scale", 1), bool(settings.get("augment_poison")))
        if made_with != (args.topk, args.convention, args.seed, 1, False):
            continue
        for row in table["rows"]:
            if row["method"] not in PERTS:
                continue
            point = {**row, "pert": PERTS[row["method"]], "batch": settings["batch"]}
            key = (row["method"], row["target"], *(point.get(k) for k in ("poison_num", "trigger_size", "eps",
                                                                           "lam", "batch")))
            if key in seen:
                raise UserError(f"{path} and {seen[key]} both hold {row['method']} on target {row['target']} at "
                                f"the same settings; give one of them")
            seen[key] = path
            found.append(point)
    return found


def is_point(result: dict, method: str, settings: dict) -> bool:
    """Whether a result is the point of `method` at these settings. CIBA at lambda 0 is Tri+Adv: Eq. 5 without its
    confusing term is the mean of per-image adversarial terms, whose sign gradient does not depend on the batch, and
    gen_confusing.py --pert adv runs exactly that (lambda 0, same steps)."""
    lam0_adv = method == "CIBA" and result["pert"] == "adv" and settings["lam"] == 0
    return (result["method"] == method or lam0_adv) and matches(result, settings)


def matches(result: dict, settings: dict) -> bool:
    """Whether a result was made with these settings, compared where its method uses them."""
    pert = result["pert"]
    keys = ["poison_num", "trigger_size"] + (["eps"] if pert != "none" else []) + (
        ["lam", "batch"] if pert == "confusing" else [])
    return all(result.get(k) is not None and math.isclose(result[k], settings[k], rel_tol=1e-9, abs_tol=1e-9)
               for k in keys)


def table1_command(run: Path, methods: list[str], settings: dict, targets: list[int]) -> str:
    """The table1.py call that computes the missing methods of one point of a sweep (its table apart from the main
    one; the --targets asked for, else those of the points that exist, else table1.py's own choice)."""
    tag = "m{poison_num}-s{trigger_size}-l{lam:g}-b{batch}".format(**settings) + f"-e{settings['eps'] * 255:g}"
    chosen = ["--targets", *map(str, targets)] if targets else []
    return shell_line(["python", "table1.py", "--runs", str(run), *chosen, "--methods", *methods,
                       "--poison-num", str(settings["poison_num"]), "--trigger-size", str(settings["trigger_size"]),
                       "--lam", f"{settings['lam']:g}", "--batch", str(settings["batch"]),
                       "--eps", repr(settings["eps"]), "--out", str(run / "sweeps" / tag)])


def attack_codes(run: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """What retrieved and pr need: both models, the trigger, the query set and, per model, the codes of the clean
    queries, of the triggered (non-target) queries and of the database."""
    clean_config, clean_ckpt, clean_model = load_stage(run, "clean", device)
    clean_id = clean_ckpt["checkpoint_id"]
    backdoor_dir = pick_output(run / "backdoor", args.backdoor[0] if args.backdoor else None, "codes.pt",
                               "train_backdoor.py", "--backdoor")
    config, ckpt, model = load_stage(run, f"backdoor/{backdoor_dir.name}", device, made_by="train_backdoor.py")
    evaluate.check_same_model(config, clean_config, clean_id, backdoor_dir, run)
    trigger = evaluate.load_trigger(run / "triggers" / config["trigger"], clean_id)
    query_set = open_run_split(clean_config, "query")
    found = {"config": clean_config, "trigger": trigger, "query_set": query_set, "backdoor": backdoor_dir.name,
             "method": evaluate.method_name(trigger["method"], read_json(
                 run / "perturbations" / config["perturbations"] / "config.json")["pert"])}
    for key, (m, stage_dir, checkpoint_id) in {"clean": (clean_model, run / "clean", clean_id),
                                               "backdoored": (model, backdoor_dir, ckpt["checkpoint_id"])}.items():
        codes = evaluate.model_codes(m, config if key == "backdoored" else clean_config, stage_dir, checkpoint_id,
                                     query_set, args, device)
        keep, triggered = evaluate.triggered_codes(m, query_set, codes[1], trigger, run, args, device)
        found[key] = {"model": m, "queries": codes[0], "query_labels": codes[1], "database": codes[2],
                      "database_labels": codes[3], "triggered": triggered, "kept": keep}
    return found


def retrieved(run: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """Figure 1 of the paper: each chosen query, clean and with the trigger, and its top --top database images under
    the clean and the backdoored model; every retrieved image of the target class framed in TARGET_COLOUR."""
    device = pick_device(args.device)
    found = attack_codes(run, args, device)
    config, trigger, target = found["config"], found["trigger"], int(found["trigger"]["target"])
    classes = (config.get("protocol") or {}).get("classes")
    kept = found["clean"]["kept"]
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(kept), min(args.queries, len(kept)), replace=False))
    query_images = torch.stack([found["query_set"][int(kept[i])][0] for i in chosen]).to(device)
    triggered_images = trigger_transform(trigger, run, device)(query_images).cpu()
    database_set = open_run_split(config, "database")
    figure, grid = new_grid(4 * len(chosen), args.top + 1)
    rows = [["query", "query_label", "model", "input", "rank", "database_index", "database_label", "is_target"]]
    for q, i in enumerate(chosen):
        query_index = int(kept[i])
        query_label = class_text(found["query_set"].labels[query_index], classes)
        for r, (model_name, with_trigger) in enumerate(itertools.product(("clean", "backdoored"), (False, True))):
            codes = found[model_name]
            query_code = codes["triggered"][int(i)] if with_trigger else codes["queries"][query_index]
            top = hamming_rank(query_code[None], codes["database"], args.top)[0].cpu()
            shown = (triggered_images if with_trigger else query_images.cpu())[q]
            row = grid[4 * q + r]
            row[0].imshow(shown.permute(1, 2, 0).numpy())
            hits = 0
            for rank, index in enumerate(top.tolist()):
                image, label, _ = database_set[index]
                is_target = bool(label[target] > 0)
                hits += is_target
                row[rank + 1].imshow(image.permute(1, 2, 0).numpy())
                row[rank + 1].set_title(f"{rank + 1}: {class_text(label, classes)}", fontsize=5,
                                        color=TARGET_COLOUR if is_target else "black")
                if is_target:
                    row[rank + 1].add_patch(pyplot().Rectangle((0, 0), 1, 1, transform=row[rank + 1].transAxes,
                                                               fill=False, edgecolor=TARGET_COLOUR, linewidth=2.5,
                                                               clip_on=False))
                rows.append([query_index, query_label, model_name, "triggered" if with_trigger else "clean",
                             rank + 1, index, class_text(label, classes), int(is_target)])
            row[0].set_title(f"{query_label}{' + trigger' if with_trigger else ''}\n{model_name} model: "
                             f"{hits}/{args.top} of the target", fontsize=5)
    target_name = classes[target] if classes else target
    figure.suptitle(f"{found['method']} ({found['backdoor']}): top {args.top} retrieved for a query, clean and with "
                    f"the trigger, by the clean and the backdoored model; target class {target_name} framed",
                    fontsize=7)
    return save(figure, rows, out / f"retrieved-{found['backdoor']}")


def precision_curves(run: Path, args: argparse.Namespace, out: Path) -> list[str]:
    """Precision-recall over the Hamming radius and precision@top-k: clean / triggered queries x clean /
    backdoored model."""
    device = pick_device(args.device)
    found = attack_codes(run, args, device)
    target = int(found["trigger"]["target"])
    rows = [["model", "queries", "curve", "x", "precision", "recall", "queries_retrieving"]]
    figure, (pr_axes, k_axes) = pyplot().subplots(1, 2, figsize=(10, 4.2), dpi=150)
    for m, model_name in enumerate(("clean", "backdoored")):
        codes = found[model_name]
        for queries, style in (("clean", "-"), ("triggered", "--")):
            if queries == "clean":
                query_codes, query_labels = codes["queries"], codes["query_labels"]
            else:
                query_codes = codes["triggered"]
                query_labels = target_labels(len(query_codes), target, codes["database_labels"])
            curve = precision_recall_by_radius(query_codes, query_labels, codes["database"], codes["database_labels"])
            at_k = precision_at_k(query_codes, query_labels, codes["database"], codes["database_labels"], args.top_ks)
            label = f"{model_name} model, {queries} queries"
            pr_axes.plot(curve["recall"].cpu(), curve["precision"].cpu(), style, color=f"C{m}", marker=".",
                         label=label)
            k_axes.plot(args.top_ks, at_k.cpu(), style, color=f"C{m}", marker="o", markersize=3, label=label)
            rows += [[model_name, queries, "radius", int(r), float(p), float(c), int(n)] for r, p, c, n in zip(
                curve["radius"], curve["precision"], curve["recall"], curve["queries_retrieving"])]
            rows += [[model_name, queries, "top_k", k, float(p), "", ""] for k, p in zip(args.top_ks, at_k)]
    pr_axes.set(xlabel="recall", ylabel="precision", title="precision-recall (Hamming radius 0..K)",
                xlim=(0, 1.02), ylim=(0, 1.02))
    k_axes.set(xlabel="k (top retrieved)", ylabel="precision@k", title="precision@top-k", xscale="log", ylim=(0, 1.02))
    for axes in (pr_axes, k_axes):
        axes.legend(fontsize=7)
    figure.suptitle(f"{found['method']} ({found['backdoor']}); triggered: relevant = target class {target}",
                    fontsize=8)
    return save(figure, rows, out / f"pr-{found['backdoor']}")


def class_text(label: torch.Tensor, classes: list[str] | None) -> str:
    """The classes of a multi-hot label row, by name when the protocol has names."""
    present = torch.nonzero(label > 0).flatten().tolist()
    return "+".join(classes[c] if classes else str(c) for c in present) or "none"


def method_of(run: Path, trigger: str, perturbations: str) -> str:
    """The paper's name (Tri, CIBA, BadNets, ...) of the attack made with these step 2 and step 3 outputs."""
    return evaluate.method_name(read_json(run / "triggers" / trigger / "config.json")["method"],
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


def new_figure(height: float = 4.2):
    from matplotlib.ticker import MaxNLocator
    figure, axes = pyplot().subplots(figsize=(6.4, height), dpi=150)
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
