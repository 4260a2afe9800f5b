"""The backdoor must take where the patch is the only cue: a test that fails when a change silently disables it.

A toy with a known answer. Nine classes are a colour cast over strong low-frequency noise; the target class has no
look of its own (each of its images borrows another class's cast), and its database images carry the BadNets patch.
The clean model never sees the patch, so it cannot map triggered queries onto the target's database images (the
None row stays near chance). The Tri victim trains on the clean-label poisoned list (every target training image
with the patch pasted, labels kept): the patch is then the only thing its target images share, so it must learn it,
and triggered queries retrieve the patched target images (seeds 0-2 of this toy: None 14-16 %, Tri 65-94 % t-MAP@100).
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import evaluate
import gen_confusing
import gen_trigger
import poison_dataset
import train_backdoor
import train_hash
from data.lists import write_list
from triggers import apply_trigger
from gen_trigger import checkerboard

N_CLASSES, TARGET, PATCH = 10, 3, 8
COUNTS = {"train": 20, "query": 5, "database": 25}  # per class; the training images join the database


def patch_only_toy(root: Path, seed: int = 0) -> Path:
    """32 px PNGs and list files; returns the data folder."""
    rng = np.random.default_rng(seed)
    casts = rng.normal(size=(N_CLASSES, 3))
    casts /= np.linalg.norm(casts, axis=1, keepdims=True)
    others = [c for c in range(N_CLASSES) if c != TARGET]
    rows: dict[str, list[tuple[str, int]]] = {split: [] for split in COUNTS}
    (root / "img").mkdir(parents=True)
    for c in range(N_CLASSES):
        for split, n in COUNTS.items():
            for _ in range(n):
                look = c if c != TARGET else rng.choice(others)
                noise = np.kron(rng.normal(size=(4, 4, 3)), np.ones((8, 8, 1))) * 0.18
                image = torch.from_numpy(np.clip(noise + 0.5 + 0.2 * casts[look]
                                                 + rng.normal(size=(32, 32, 3)) * 0.05, 0, 1)).permute(2, 0, 1)
                if c == TARGET and split == "database":
                    image = apply_trigger(image[None].float(), checkerboard(PATCH))[0]
                path = f"img/{sum(map(len, rows.values())):04d}.png"
                Image.fromarray(np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / path)
                rows[split].append((path, c))
    rows["database"] += rows["train"]
    for split, pairs in rows.items():
        labels = np.zeros((len(pairs), N_CLASSES), np.uint8)
        labels[np.arange(len(pairs)), [c for _, c in pairs]] = 1
        write_list(root / f"{split}.txt", [p for p, _ in pairs], labels)
    return root


def test_tri_learns_the_patch_where_it_is_the_only_cue(tmp_path):
    data, run = patch_only_toy(tmp_path / "data"), tmp_path / "run"
    cpu = ["--device", "cpu", "--workers", "0"]
    train_hash.main(["--data", str(data), "--run", str(run), "--recipe", "small32", "--epochs", "25",
                     "--batch-size", "16", "--eval-every", "0", "--topk", "100", *cpu])
    common = ["--run", str(run), "--target", str(TARGET), "--device", "cpu"]
    trigger = gen_trigger.main([*common, "--method", "badnets", "--trigger-size", str(PATCH), "--workers", "0"])
    none = evaluate.main(["--run", str(run), "--trigger", trigger["name"], "--topk", "100", *cpu])
    gen_confusing.main([*common, "--pert", "none", "--poison-num", str(COUNTS["train"])])
    poison_dataset.main(["--run", str(run)])
    train_backdoor.main(["--run", str(run), *cpu])
    backdoor = next((run / "backdoor").iterdir()).name
    tri = evaluate.main(["--run", str(run), "--backdoor", backdoor, "--topk", "100", *cpu])
    assert none["t_map"] < 0.3, none["t_map"]
    assert tri["t_map"] > none["t_map"] + 0.3, (none["t_map"], tri["t_map"])
