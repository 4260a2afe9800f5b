"""Check (not a speed figure): how far does Eq. 7 move a clean model's codes, and after how many steps?

    python bench/trigger_convergence.py --run checkpoint/nette-photo128-48 --target 2 --steps 300 \\
        --step-sizes 12 48 192 --trigger-sizes 14 --out bench/results/trigger_convergence_nette_t2.json

For each trigger size and step size, gen_trigger.adversarial_patch (the code step 2 runs: the paper's mid-grey
start, per-image L2-normalised gradients, tanh scale beta from 0.1 to 1 over the steps) optimises the patch against
RUN's clean model on the same seeded batches of training images (--fixed-batch: on the first batch at every step, a
test of what a patch of that size can do at all), and records per step the batch's mean Hamming
distance between the binary codes of the triggered images and the target's anchor code (the loss of Eq. 7 with
binary codes). Prints the means over consecutive tenths of the steps and, for the finished patch, the distance of the
non-target queries' codes to the anchor without and with it; writes the histories as JSON and a plot beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import make_loader, open_run_split  # noqa: E402
from data.protocols import choose_class  # noqa: E402
from gen_trigger import adversarial_patch, trigger_batches  # noqa: E402
from models.hash_network import binarize, load_stage  # noqa: E402
from retrieval import anchor_code  # noqa: E402
from retrieval.metrics import hamming_distance, non_target_queries  # noqa: E402
from runs import cli_entry, load_saved, provenance, require_at_least_one, write_json  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from triggers import apply_trigger  # noqa: E402

from bench.timing import bench_device  # noqa: E402

RUN = "checkpoint/demo"  # run directory with a trained clean model (step 1)
TARGET = None  # class index or name; None: drawn with SEED, as gen_trigger.py draws it
STEPS = 300  # optimisation steps of each setting (gen_trigger.py: 2,000)
BATCH_SIZE = 32  # training images per step
STEP_SIZES = [12.0]  # pixel units (0-255) per step along the normalised gradient (gen_trigger.py: 12)
TRIGGER_SIZES = [14]  # px of the patch
FIXED_BATCH = False  # every step on the first batch: can any patch of this size move these images' codes at all?
CACHE = "auto"  # gen_trigger.py --cache
WORKERS = 2  # data-loading processes
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # the batches (gen_trigger.py's default draw)
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the histories (and a .png beside it); None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--step-sizes", type=float, nargs="+", default=STEP_SIZES)
    p.add_argument("--trigger-sizes", type=int, nargs="+", default=TRIGGER_SIZES)
    p.add_argument("--fixed-batch", default=FIXED_BATCH, action=argparse.BooleanOptionalAction)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "steps", "batch_size")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    clean, _, model = load_stage(args.run, "clean", device)
    codes = load_saved(Path(args.run) / "clean" / "codes.pt", f"train_hash.py --run {args.run} --resume")
    target = choose_class(args.target, (clean.get("protocol") or {}).get("classes"), clean["n_classes"], args.seed)
    anchor = anchor_code(codes["train_codes"], codes["train_labels"], target).to(device).float()
    batches, _ = trigger_batches(open_run_split(clean, "train"), clean, args, device)
    if args.fixed_batch:
        batches = [next(iter(batches))] * args.steps
    queries, query_labels = query_images(clean, args.workers)
    queries = queries[non_target_queries(query_labels, target)]
    runs = []
    for trigger_size in args.trigger_sizes:
        for step_size in args.step_sizes:
            pattern, history = adversarial_patch(model, batches, anchor, trigger_size, step_size, device)
            tenths = [sum(part) / len(part) for part in chunks(history, 10)]
            plain, triggered = (query_distance(model, images, anchor, device)
                                for images in (queries, apply_trigger(queries, pattern.cpu())))
            runs.append({"trigger_size": trigger_size, "step_size": step_size, "history": history,
                         "tenths": tenths, "queries_plain": plain, "queries_triggered": triggered})
            print(f"s = {trigger_size} px, step {step_size:g}: distance to the anchor by tenths of the steps "
                  + " ".join(f"{t:.2f}" for t in tenths)
                  + f"; non-target queries {plain:.2f} -> {triggered:.2f} bits with the finished patch")
    record = {"run": args.run, "target": target, "steps": args.steps, "batch_size": args.batch_size,
              "fixed_batch": args.fixed_batch, "seed": args.seed, "runs": runs, "provenance": provenance(device)}
    if args.out:
        write_json(record, args.out)
        plot(runs, Path(args.out).with_suffix(".png"), clean["bits"])
    return record


def chunks(values: list[float], parts: int) -> list[list[float]]:
    size = max(1, len(values) // parts)
    return [values[i:i + size] for i in range(0, size * parts, size) if values[i:i + size]]


def query_images(clean: dict, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query image in [0, 1] and its labels."""
    loader = make_loader(open_run_split(clean, "query"), 256, workers)
    images, labels = zip(*((batch[0], batch[1]) for batch in loader))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def query_distance(model: torch.nn.Module, images: torch.Tensor, anchor: torch.Tensor, device: torch.device) -> float:
    """Mean Hamming distance of the images' binary codes to the anchor."""
    total = sum(hamming_distance(binarize(model.logits(chunk.to(device))), anchor[None]).sum().item()
                for chunk in images.split(256))
    return total / len(images)


def plot(runs: list[dict], path: Path, bits: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        history = torch.tensor(run["history"])
        window = max(1, len(history) // 50)
        smooth = history.unfold(0, window, window).mean(1)
        ax.plot((torch.arange(len(smooth)) + 0.5) * window, smooth,
                label=f"{run['trigger_size']} px, step {run['step_size']:g}")
    ax.set(xlabel="step", ylabel=f"mean d_H to the anchor (of {bits} bits)", title="Eq. 7 against the step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli_entry(main)
