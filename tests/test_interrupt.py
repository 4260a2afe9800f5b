"""A training killed with SIGKILL in the middle of an epoch resumes to the weights of an uninterrupted run."""
import subprocess
import sys

import torch

from conftest import REPO, kill_at, tiny_train_args


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tiny_data, tmp_path):
    args = [*tiny_train_args(tiny_data, tmp_path / "killed"), "--epochs", "4", "--batch-size", "4",
            "--eval-every", "0"]
    kill_at("train_hash.py", args, "epoch 1/4")  # epoch 1 is on disk; epoch 2 (25 steps of 4 images) is under way
    ckpt = torch.load(tmp_path / "killed" / "clean" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] in (1, 2) and not (tmp_path / "killed" / "clean" / "codes.pt").exists()
    resumed = subprocess.run([sys.executable, str(REPO / "train_hash.py"), *args, "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'killed' / 'clean' / 'checkpoint.pt'} after epoch" in resumed.stdout
    straight = subprocess.run([sys.executable, str(REPO / "train_hash.py"),
                               *[a if a != str(tmp_path / "killed") else str(tmp_path / "straight") for a in args]],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = torch.load(tmp_path / "killed" / "clean" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "straight" / "clean" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for name, value in b["model"].items():
        assert torch.equal(value, a["model"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
