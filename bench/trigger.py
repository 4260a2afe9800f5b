"""Benchmark: step 2's adversarial patch (Eq. 7), batched as gen_trigger.py computes it (one forward/backward of the
whole batch per step), against one image at a time (a forward/backward per image, the normalised gradients summed,
then the step), the structure of the paper's public code. That code also runs a forward of each clean image, which
its loss does not use, and reads each step's images from disk; the reference leaves both out, so the ratio is that
of batching alone.

    python bench/trigger.py                           # 100 steps of 32 images, 4 px patch, small backbone, 32 px
    python bench/trigger.py --arch vgg11 --image-size 224 --trigger-size 24 --steps 5 --batch-size 8

Both sides see the same batches and follow the same schedule (tanh scale, normalised steps), so the patches must
agree up to floating-point noise; the table gives the largest difference of the patches and of the recorded mean
distances, and the arithmetic rate of each side (GFLOP/s: the convolutions and matrix products forward and backward,
counted by torch's FLOP counter, over the median time). Below it, the rate of the network's fastest convolution layer
run alone (forward, on the input it gets in the batched step), a measure of what this machine's kernels reach: as
long as the batched step's arithmetic runs no faster than that, the speed-up cannot pass that rate over the one-image
side's rate. Random images, a random anchor and a randomly initialised network stand in for the data and the clean
model (the cost does not depend on the weights). With --fold-bn (gen_trigger.py's flag) the batched side runs on a
copy of the network with its batch norms folded into the convolutions; the one-image side always runs on the network
itself, as the public code does. Each side runs --repeats times, the two alternating.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gen_trigger import FOLD_BN, STEP_SIZE, adversarial_patch, beta_at  # noqa: E402
from models.hash_network import ARCHS, binarize, build_model, fold_batch_norms  # noqa: E402
from runs.cli import explain_flags  # noqa: E402
from runs import cli_entry, provenance, require_at_least_one, write_json  # noqa: E402
from triggers import apply_trigger, check_trigger_size  # noqa: E402

from bench.timing import alternating, bench_device, counted_flops, timed  # noqa: E402

ARCH = "small"  # network the trigger is optimised against
BITS = 48  # code length
IMAGE_SIZE = 32  # px of the square images
TRIGGER_SIZE = 4  # px of the patch
STEPS = 100  # of the paper code's 2,000: the cost per step is what is compared
BATCH_SIZE = 32  # images per step
REPEATS = 3  # timed runs of each side, alternating; the table gives the medians
LAYER_CALLS = 20  # timed forward calls of each convolution layer alone, for the fastest-layer rate
THREADS = None  # torch CPU threads; None: torch's default
SEED = 0  # weights and images
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OUT = None  # JSON file for the results; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=ARCH, choices=ARCHS)
    p.add_argument("--bits", type=int, default=BITS)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--trigger-size", type=int, default=TRIGGER_SIZE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--step-size", type=float, default=STEP_SIZE, help="gen_trigger.py --step-size")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--layer-calls", type=int, default=LAYER_CALLS)
    p.add_argument("--fold-bn", default=FOLD_BN, action=argparse.BooleanOptionalAction,
                   help="the batched side on a copy with batch norms folded (gen_trigger.py --fold-bn)")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args = p.parse_args(argv)
    require_at_least_one(args, "bits", "image_size", "trigger_size", "steps", "batch_size", "repeats",
                         "layer_calls")
    check_trigger_size(args.trigger_size, args.image_size)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.threads, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [(torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device),)
               for _ in range(args.steps)]
    anchor = (torch.randint(0, 2, (args.bits,), generator=generator) * 2 - 1).to(device)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.bits).to(device).eval()
    batched_model = fold_batch_norms(model) if args.fold_bn else model
    adversarial_patch(batched_model, batches[:1], anchor, args.trigger_size, args.step_size, device)  # warm-up
    ((pattern, distances), (pattern_loop, distances_loop)), (batched_times, loop_times) = alternating(
        [lambda: adversarial_patch(batched_model, batches, anchor, args.trigger_size, args.step_size, device),
         lambda: per_image_patch(model, batches, anchor, args.trigger_size, args.step_size, device)],
        args.repeats, device)
    batched_seconds, loop_seconds = statistics.median(batched_times), statistics.median(loop_times)
    batched_flops = args.steps * counted_flops(
        lambda: adversarial_patch(batched_model, batches[:1], anchor, args.trigger_size, args.step_size, device))
    loop_flops = args.steps * counted_flops(
        lambda: per_image_patch(model, batches[:1], anchor, args.trigger_size, args.step_size, device))
    layer_rate = fastest_convolution_rate(batched_model, batches[0][0], args.layer_calls, device)
    loop_rate = loop_flops / loop_seconds / 1e9
    row = {"batched_seconds": round(batched_seconds, 3), "per_image_seconds": round(loop_seconds, 3),
           "batched_seconds_each": [round(t, 3) for t in batched_times],
           "per_image_seconds_each": [round(t, 3) for t in loop_times],
           "speedup": loop_seconds / batched_seconds,
           "pattern_max_difference": float((pattern - pattern_loop).abs().max()) * 255,
           "distance_max_difference": max(abs(a - b) for a, b in zip(distances, distances_loop)),
           "final_mean_distance": distances[-1],
           "flops_per_image_step": batched_flops / (args.steps * args.batch_size),
           "per_image_flops_per_image_step": loop_flops / (args.steps * args.batch_size),
           "batched_gflops_per_s": batched_flops / batched_seconds / 1e9, "per_image_gflops_per_s": loop_rate,
           "fastest_convolution_gflops_per_s": layer_rate,
           "speedup_at_fastest_convolution_rate": layer_rate / loop_rate}
    print(f"adversarial patch, {args.steps} steps of {args.batch_size} images, {args.trigger_size} px, {args.arch} "
          f"{args.image_size} px, batch norms {'folded' if args.fold_bn else 'kept'} on the batched side, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"| one image at a time (s, median of {args.repeats}) | batched (s, median) | speed-up | "
          "largest patch difference (/255) | largest distance difference (bits) | GFLOP/s, one image / batched |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {row['per_image_seconds']:.2f} | {row['batched_seconds']:.3f} | x{row['speedup']:.1f} | "
          f"{row['pattern_max_difference']:.2e} | {row['distance_max_difference']:.2e} | "
          f"{loop_rate:.1f} / {row['batched_gflops_per_s']:.1f} |")
    print(f"{row['flops_per_image_step'] / 1e6:.1f} MFLOP per image and step; the network's fastest convolution "
          f"layer alone runs at {layer_rate:.1f} GFLOP/s, x{row['speedup_at_fastest_convolution_rate']:.1f} the "
          "one-image rate")
    record = {"settings": vars(args), "threads": torch.get_num_threads(), "result": row,
              "provenance": provenance(device)}
    if args.out:
        write_json(record, Path(args.out))
    return record


def per_image_patch(model: torch.nn.Module, batches: list, anchor: torch.Tensor, trigger_size: int,
                    step_size: float, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """The reference: per step, each image alone through the network and back, its gradient normalised and summed;
    then the same step as gen_trigger.adversarial_patch. Returns the patch and the mean distance per step."""
    model.eval().requires_grad_(False)
    pattern = torch.full((3, trigger_size, trigger_size), 0.5, device=device)
    anchor = anchor.float()
    bits = anchor.numel()
    distances = []
    for step, (images, *_) in enumerate(batches):
        total, distance = torch.zeros_like(pattern), 0.0
        for image in images:
            own = pattern.clone().requires_grad_(True)
            logits = model.logits(apply_trigger(image[None], own))
            relaxed = torch.tanh(beta_at(step, len(batches)) * logits)
            grad, = torch.autograd.grad(((bits - relaxed @ anchor) / 2).sum(), own)
            total += grad / grad.norm().clamp(min=1e-12)
            distance += float((bits - binarize(logits.detach()) @ anchor).squeeze() / 2)
        pattern = (pattern - step_size / 255 * total / len(images)).clamp(0, 1)
        distances.append(distance / len(images))
    return pattern, distances


def fastest_convolution_rate(model: torch.nn.Module, images: torch.Tensor, calls: int, device: torch.device) -> float:
    """GFLOP/s of the fastest Conv2d layer of `model`, each run alone (forward, no grad, `calls` timed calls) on the
    input it receives when `images` go through the network."""
    inputs = []
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda layer, args, out: inputs.append((layer, args[0]))) for c in convolutions]
    try:
        with torch.no_grad():
            model.logits(images)
    finally:
        for hook in hooks:
            hook.remove()
    rates = []
    with torch.no_grad():
        for layer, x in inputs:
            flops = counted_flops(lambda: layer(x))
            rates.append(flops / timed(lambda: layer(x), calls, 3, device) * 1000 / 1e9)
    return max(rates)


if __name__ == "__main__":
    cli_entry(main)
