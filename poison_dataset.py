"""Step 4: the poisoned training set: x_hat = T(clip(x + eta)) for the M chosen images, T the trigger of step 2.

    python poison_dataset.py --run checkpoint/demo --trigger ciba-t3-s4 \\
        --perturbations confusing-t3-m60-e8-l0.8-b20-s20-seed0

Reads a trigger of step 2 (RUN/triggers/NAME) and perturbations of step 3 (RUN/perturbations/NAME); when only one
of a kind exists its name may be left out. T is B(x, p) of Eq. 6 for a patch (CIBA, BadNets), (1 - r) x + r p for
Blend, and BadHash's generator with the target's LabCLN feature; with --pert noise in step 3 the generator receives
the noisy image (the public code's optional pre-perturbation). Each poisoned image is written as a PNG at the
canonical size S x S, so it reads back bit-identical; the perturbation is truncated to whole 8-bit steps towards 0
first, so |eta| <= eps holds for the stored image too (outside a patch). Writes
RUN/poisoned/<trigger>__<perturbations>/: images/*.png, train.txt (the training list with each poisoned image in
place of its original, absolute paths; the original, clean label, or the target's label when step 3 chose
--setting poison-label), manifest.json (the poisoned entries with their labels and their PSNR and SSIM to the
original) and config.json (settings, the mean and worst PSNR/SSIM).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from data import open_run_split, save_png, write_list
from data.quality import psnr, ssim
from models.hash_network import read_clean
from runs import (UserError, add_deterministic_flag, claim, cli_entry, fingerprint, load_saved, make_deterministic,
                  pick_device, pick_output, provenance, read_json, write_json, write_timing)
from triggers import poison_images, trigger_fingerprint, trigger_transform
from runs.cli import explain_flags

RUN = "checkpoint/demo"  # run directory with a trigger and perturbations (steps 2-3)
TRIGGER = None  # folder name under RUN/triggers/ (step 2); None: the only one there
PERTURBATIONS = None  # folder name under RUN/perturbations/ (step 3); None: the only one there
DEVICE = "auto"  # "auto" (CUDA when available), "cpu", "cuda", ...
OVERWRITE = False  # replace an existing poisoned set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN)
    p.add_argument("--trigger", default=TRIGGER)
    p.add_argument("--perturbations", default=PERTURBATIONS)
    p.add_argument("--device", default=DEVICE)
    add_deterministic_flag(p)
    p.add_argument("--overwrite", default=OVERWRITE, action="store_true")
    explain_flags(p, __file__)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    make_deterministic(args.deterministic)
    run = Path(args.run)
    clean, clean_id = read_clean(run)
    trigger_dir = pick_output(run / "triggers", args.trigger, "trigger.pt", "gen_trigger.py", "--trigger")
    pert_dir = pick_output(run / "perturbations", args.perturbations, "perturbations.pt", "gen_confusing.py",
                           "--perturbations")
    trigger = load_saved(trigger_dir / "trigger.pt", f"gen_trigger.py --overwrite (the trigger {trigger_dir.name})")
    pert = load_saved(pert_dir / "perturbations.pt", f"gen_confusing.py --overwrite ({pert_dir.name})")
    check_consistent(trigger, pert, clean_id, trigger_dir, pert_dir)
    out = run / "poisoned" / f"{trigger_dir.name}__{pert_dir.name}"
    made_from = {"trigger_id": trigger_fingerprint(trigger), "perturbations_id": perturbation_fingerprint(pert)}
    with claim(out):  # another process making the same output: wait for it, then reuse it
        if (out / "config.json").exists() and not args.overwrite:
            made = read_json(out / "config.json")
            changed = [k.replace("_id", "") for k, v in made_from.items() if made.get(k, v) != v]  # old runs: no ids
            if changed:
                raise UserError(f"{out} was made from other {' and '.join(changed)} than {trigger_dir} and {pert_dir} "
                                f"hold now (made again since?); make it again with --overwrite, then retrain step 5")
            print(f"{out} exists; reusing it (--overwrite to make it again)")
            return {**made, "name": out.name}

        t0 = time.time()
        train_set = open_run_split(clean, "train")
        indices = pert["indices"]
        originals = torch.stack([train_set[i][0] for i in indices])
        device = pick_device(args.device)
        poisoned = poison_images(originals, pert["eta"], trigger_transform(trigger, run, device), device)
        names = [f"{i:06d}.png" for i in indices]
        for image, name in zip(poisoned, names):
            save_png(image, out / "images" / name)
        image_list = train_set.image_list
        paths = list(image_list.paths)
        for i, name in zip(indices, names):
            paths[i] = str((out / "images" / name).resolve())
        setting = pert.get("setting", "clean-label")
        labels = poisoned_labels(image_list.labels, indices, int(pert["target"]), setting)
        write_list(out / "train.txt", paths, labels)
        quality_psnr, quality_ssim = psnr(poisoned, originals), ssim(poisoned, originals)
        manifest = [{"index": i, "line": image_list.line_numbers[i], "original": image_list.paths[i],
                     "poisoned": paths[i], "label": labels[i].tolist(), "original_label": image_list.labels[i].tolist(),
                     "psnr": float(p), "ssim": float(s)}
                    for i, p, s in zip(indices, quality_psnr, quality_ssim)]
        write_json(manifest, out / "manifest.json")
        finite = quality_psnr[torch.isfinite(quality_psnr)]
        record = {"trigger": trigger_dir.name, "perturbations": pert_dir.name, "target": int(pert["target"]),
                  "poison_num": len(indices), "train_size": len(paths), "poison_rate": len(indices) / len(paths),
                  "label_setting": setting, "trigger_method": trigger["method"],
                  "psnr_mean": float(finite.mean()) if len(finite) else None,
                  "psnr_worst": float(finite.min()) if len(finite) else None,
                  "ssim_mean": float(quality_ssim.mean()), "ssim_worst": float(quality_ssim.min()),
                  "max_abs_change": float((poisoned - originals).abs().max()),
                  "max_abs_change_outside_trigger": max_change_outside(poisoned, originals, trigger["trigger_size"])
                  if trigger.get("kind", "patch") == "patch" else None,
                  "clean_checkpoint_id": clean_id, **made_from,
                  "provenance": provenance()}
        write_timing(out / "config.json", {"seconds": round(time.time() - t0, 2)})
        write_json(record, out / "config.json")  # written last: its presence marks a complete output
        print(f"poisoned {len(indices)} of {len(paths)} training images ({100 * record['poison_rate']:.2f} %, "
              f"{setting}), PSNR mean {record['psnr_mean']:.2f} dB (worst {record['psnr_worst']:.2f}), SSIM mean "
              f"{record['ssim_mean']:.4f} (worst {record['ssim_worst']:.4f}) -> {out}")
        return {**record, "name": out.name}


def perturbation_fingerprint(pert: dict) -> str:
    """A short content hash of step 3's output (kind, chosen images, eta), recorded with what is made from it."""
    return fingerprint(repr((pert["pert"], list(pert["indices"]))), pert["eta"])


def check_consistent(trigger: dict, pert: dict, clean_id: str, trigger_dir: Path, pert_dir: Path) -> None:
    if trigger["target"] != pert["target"]:
        raise UserError(f"{trigger_dir.name} is a trigger for target {trigger['target']} but {pert_dir.name} "
                        f"perturbs images of target {pert['target']}; use the same --target in steps 2 and 3")
    for name, made in ((trigger_dir, trigger), (pert_dir, pert)):
        if made["clean_checkpoint_id"] != clean_id:
            raise UserError(f"{name} was made from another clean model than the one in the run now; "
                            f"make it again with --overwrite")


def poisoned_labels(labels: np.ndarray, indices: list[int], target: int, setting: str) -> np.ndarray:
    """The labels of the poisoned list: unchanged (clean-label), or the target's one-hot label on the poisoned
    images (poison-label)."""
    labels = labels.copy()
    if setting == "poison-label":
        labels[indices] = 0
        labels[indices, target] = 1
    return labels


def max_change_outside(poisoned: torch.Tensor, originals: torch.Tensor, trigger_size: int) -> float:
    """Largest |x_hat - x| outside the trigger square (bounded by eps)."""
    size = originals.shape[-1]
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[size - trigger_size:, size - trigger_size:] = False
    return float((poisoned - originals).abs()[..., mask].max()) if mask.any() else 0.0


if __name__ == "__main__":
    cli_entry(main)
