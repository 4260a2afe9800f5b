"""defend.py: fine-pruning end to end on the tiny attacked run, its bad inputs, and a killed fine-tuning resumed."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import defend
import evaluate
from runs import UserError
from tests.conftest import POISONED, REPO

SMALL = ["--device", "cpu", "--workers", "0", "--clean-images", "20", "--prune-fractions", "0", "0.5", "1",
         "--prune-fraction", "0.5", "--topk", "50"]


@pytest.fixture()
def run(attacked, tmp_path):
    """A private copy of the attacked run (the defense writes into it)."""
    copy = tmp_path / "run"
    shutil.copytree(attacked, copy)
    return copy


def test_fine_pruning_end_to_end(run):
    result = defend.main(["--run", str(run), "--fine-tune-epochs", "1", *SMALL])
    out = run / "defense" / f"fine-pruning__{POISONED}"
    assert result["method"] == "Tri" and result["layer"] == "features.21"  # the small backbone's global pool
    channels = result["channels"]
    assert channels == 128 and sorted(result["dormant_order"]) == list(range(channels))
    points = result["curve"]
    assert [(p["fraction"], p["pruned"]) for p in points] == [(0.0, 0), (0.5, 64), (1.0, 128)]
    # nothing pruned: the mask changes nothing, the scores are evaluate.py's
    reference = evaluate.main(["--run", str(run), "--backdoor", POISONED, "--device", "cpu", "--workers", "0",
                               "--topk", "50"])
    assert points[0]["map"] == pytest.approx(reference["map"], abs=1e-12)
    assert points[0]["t_map"] == pytest.approx(reference["t_map"], abs=1e-12)
    assert result["undefended"] == points[0]
    assert points[2]["map"] < points[0]["map"]  # every channel masked: one code for every image
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    mask = next(v for k, v in ckpt["model"].items() if k.endswith(".mask"))
    assert int((mask == 0).sum()) == 64 and ckpt["epoch"] == 1
    assert torch.equal(mask == 0, torch.isin(torch.arange(128), torch.tensor(result["dormant_order"][:64])))
    assert 0 <= result["defended"]["map"] <= 1 and 0 <= result["defended"]["t_map"] <= 1
    assert (out / "curve.png").stat().st_size > 1000
    assert (out / "curve.csv").read_text().splitlines()[0] == "fraction,pruned,map,t_map"
    saved = json.loads((out / "results.json").read_text())
    assert saved["defended"] == result["defended"] and saved["settings"]["clean_images"] == 20


def test_the_defender_images_are_clean_database_images(run):
    from data import open_run_split
    from models.hashnet import read_clean
    clean, _ = read_clean(run)
    held = defend.defender_images(clean, 20, 0)
    database = open_run_split(clean, "database").image_list.paths
    training = set(open_run_split(clean, "train").image_list.paths)
    assert len(set(held)) == 20 and not {database[i] for i in held} & training
    assert held == defend.defender_images(clean, 20, 0) != defend.defender_images(clean, 20, 1)


@pytest.mark.parametrize("flags,message", [
    (["--prune-fraction", "1.5"], "pruning fraction 1.5 is outside \\[0, 1\\]"),
    (["--prune-fractions", "0", "-0.1"], "pruning fraction -0.1 is outside \\[0, 1\\]"),
    (["--clean-images", "5000"], "images outside the training list; --clean-images 5000 needs at least that many"),
    (["--fine-tune-epochs", "0"], "--fine-tune-epochs must be at least 1, got 0"),
    (["--backdoor", "nothing-here"], "nothing-here"),
])
def test_defend_bad_input_is_one_error_and_writes_nothing(run, flags, message):
    with pytest.raises(UserError, match=message):
        defend.main(["--run", str(run), *SMALL, *flags])
    assert not (run / "defense").exists()


def test_defend_needs_a_backdoored_model(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "clean", bare / "clean")
    with pytest.raises(UserError, match="holds nothing yet; run train_backdoor.py first"):
        defend.main(["--run", str(bare), *SMALL])


def test_killed_fine_tuning_resumes_to_the_uninterrupted_weights(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    args = [*SMALL, "--fine-tune-epochs", "3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "defend.py"), "--run", str(run), *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/3"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL
    out = f"defense/fine-pruning__{POISONED}"
    assert not (run / out / "results.json").exists()
    resumed = subprocess.run([sys.executable, str(REPO / "defend.py"), "--run", str(run), *args, "--resume"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    done = subprocess.run([sys.executable, str(REPO / "defend.py"), "--run", str(straight), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (torch.load(r / out / "checkpoint.pt", weights_only=False) for r in (run, straight))
    assert a["epoch"] == b["epoch"] == 3
    for name, value in b["model"].items():
        assert torch.equal(value, a["model"][name]), name
    results = [json.loads((r / out / "results.json").read_text()) for r in (run, straight)]
    assert results[0]["defended"] == results[1]["defended"] and results[0]["curve"] == results[1]["curve"]


def test_a_finished_defense_is_reused_with_its_weights(run):
    first = defend.main(["--run", str(run), "--fine-tune-epochs", "1", *SMALL])
    again = defend.main(["--run", str(run), "--fine-tune-epochs", "1", "--resume", *SMALL])
    assert again["defended"] == first["defended"] and again["curve"] == first["curve"]
