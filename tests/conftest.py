"""Shared fixtures: a tiny synthetic data set and a tiny trained run (CPU, seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.protocols import Protocol
from data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parent.parent
TINY = Protocol("tiny", query_per_class=4, train_per_class=10, seed=0)


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


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run one of the numbered scripts as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
