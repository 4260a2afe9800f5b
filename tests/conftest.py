"""Shared fixtures: a tiny synthetic data set and a tiny trained run (CPU, seconds)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data.protocols import Protocol
from data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parent.parent
TINY = Protocol("tiny", query_per_class=4, train_per_class=10, seed=0)
POISONED = "ciba-t2-s4__none-t2-m5-seed0"  # the poisoned set of the `attacked` run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """10 classes x 24 images of 32x32: train 100, query 40, database 200."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(out, n_classes=10, per_class=24, size=32, seed=0, protocol=TINY)
    return out


def tiny_train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--run", str(run), "--recipe", "small32", "--epochs", "2", "--batch-size", "16",
            "--workers", "0", "--eval-every", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    import train_hash
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_hash.main(tiny_train_args(tiny_data, run))
    return run


@pytest.fixture(scope="session")
def attacked(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with a trigger, Tri perturbations, a poisoned set and a backdoored model."""
    import gen_confusing
    import gen_trigger
    import poison_dataset
    import train_backdoor
    run = tmp_path_factory.mktemp("attacked") / "run"
    # the clean model only: tests that ran before may have added triggers and the like to the shared tiny run
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned", "backdoor",
                                                                 "figures"))
    common = ["--run", str(run), "--target", "2", "--device", "cpu"]
    gen_trigger.main([*common, "--trigger-size", "4", "--steps", "4", "--batch-size", "8", "--workers", "0"])
    gen_confusing.main([*common, "--pert", "none", "--poison-num", "5"])
    poison_dataset.main(["--run", str(run)])
    train_backdoor.main(["--run", str(run), "--device", "cpu", "--workers", "0"])
    return run


@pytest.fixture()
def attacked_copy(attacked, tmp_path) -> Path:
    """A private copy of the attacked run, for a test that writes into it (a defense)."""
    copy = tmp_path / "run"
    shutil.copytree(attacked, copy)
    return copy


def swap_checkpoint_model(stage: Path, **config) -> None:
    """Put a checkpoint of another model (`config`: other arch, bits or image size) into a run's model folder, with
    a valid id, as if it had been copied in from another run."""
    import torch

    from models import build_model
    from runs import weights_id
    path = stage / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"] = {**ckpt["config"], **config}
    ckpt["model"] = build_model(ckpt["config"]["arch"], ckpt["config"]["bits"]).state_dict()
    ckpt["checkpoint_id"] = weights_id(ckpt["model"])
    torch.save(ckpt, path)


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run one of the numbered scripts as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def kill_at(script: str, args: list[str], line_start: str) -> None:
    """Run a script and SIGKILL it as soon as it prints a line starting with `line_start` (the state on disk is then
    that of a process killed at that point), checking that it died of the signal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(line_start):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL, f"{script} ended without printing {line_start!r}"
