"""defend.py: fine-pruning and anti-backdoor learning end to end on the tiny attacked run, their bad inputs, and
killed defenses resumed to the uninterrupted result."""
import json
import shutil

import numpy as np
import pytest
import torch

import defend
import evaluate
from defenses import defender_images
from defenses.abl import LocalGradientAscent, isolated_indices
from defenses.dp import DPStep
from models import build_loss, build_model
from models.training import training_step
from runs import UserError
from tests.conftest import POISONED, kill_at, run_script

SMALL = ["--device", "cpu", "--workers", "0", "--clean-images", "20", "--prune-fractions", "0", "0.5", "1",
         "--prune-fraction", "0.5", "--topk", "50"]


@pytest.fixture()
def run(attacked_copy):
    return attacked_copy


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
    from models.hash_network import read_clean
    clean, _ = read_clean(run)
    held = defender_images(clean, 20, 0)
    database = open_run_split(clean, "database").image_list.paths
    training = set(open_run_split(clean, "train").image_list.paths)
    assert len(set(held)) == 20 and not {database[i] for i in held} & training
    assert held == defender_images(clean, 20, 0) != defender_images(clean, 20, 1)


@pytest.mark.parametrize("flags,message", [
    (["--prune-fraction", "1.5"], "pruning fraction 1.5 is outside \\[0, 1\\]"),
    (["--prune-fractions", "0", "-0.1"], "pruning fraction -0.1 is outside \\[0, 1\\]"),
    (["--clean-images", "5000"], "images outside the training list; --clean-images 5000 needs at least that many"),
    (["--fine-tune-epochs", "0"], "--fine-tune-epochs must be at least 1, got 0"),
    (["--backdoor", "nothing-here"], "nothing-here"),
    (["--defense", "abl", "--isolation-ratio", "0"], "--isolation-ratio 0 is outside \\(0, 1\\)"),
    (["--defense", "abl", "--isolation-ratio", "1.5"], "--isolation-ratio 1.5 is outside \\(0, 1\\)"),
    (["--defense", "abl", "--gamma", "-0.1"], "--gamma -0.1 is below 0"),
    (["--defense", "abl", "--abl-epochs", "0"], "--abl-epochs must be at least 1, got 0"),
    (["--defense", "abl", "--unlearn-epochs", "0"], "--unlearn-epochs must be at least 1, got 0"),
    (["--defense", "abl", "--isolation-epochs", "2"], "the clean recipe trains 2 epochs and --isolation-epochs 2 "
                                                      "leaves none"),
    (["--defense", "dp", "--noise-multiplier", "-1"], "--noise-multiplier -1 is below 0"),
    (["--defense", "dp", "--clip-norm", "0"], "--clip-norm 0 must be above 0"),
    (["--defense", "dp", "--dp-epochs", "0"], "--dp-epochs must be at least 1, got 0"),
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


def resume_and_run_straight(run, straight, args: list[str]) -> None:
    """Resume the killed defense of `run`, and run the same defense uninterrupted on its copy `straight`."""
    resumed = run_script("defend.py", "--run", str(run), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    done = run_script("defend.py", "--run", str(straight), *args)
    assert done.returncode == 0, done.stderr[-2000:]


def assert_same_weights(a: dict, b: dict, where: str = "") -> None:
    for name, value in b["model"].items():
        assert torch.equal(value, a["model"][name]), (where, name)


def test_killed_fine_tuning_resumes_to_the_uninterrupted_weights(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    args = [*SMALL, "--fine-tune-epochs", "3"]
    kill_at("defend.py", ["--run", str(run), *args], "epoch 1/3")
    out = f"defense/fine-pruning__{POISONED}"
    assert not (run / out / "results.json").exists()
    resume_and_run_straight(run, straight, args)
    a, b = (torch.load(r / out / "checkpoint.pt", weights_only=False) for r in (run, straight))
    assert a["epoch"] == b["epoch"] == 3
    assert_same_weights(a, b)
    results = [json.loads((r / out / "results.json").read_text()) for r in (run, straight)]
    assert results[0]["defended"] == results[1]["defended"] and results[0]["curve"] == results[1]["curve"]


def test_a_finished_defense_is_reused_with_its_weights(run):
    first = defend.main(["--run", str(run), "--fine-tune-epochs", "1", *SMALL])
    again = defend.main(["--run", str(run), "--fine-tune-epochs", "1", "--resume", *SMALL])
    assert again["defended"] == first["defended"] and again["curve"] == first["curve"]


ABL = ["--defense", "abl", "--isolation-epochs", "1", "--abl-epochs", "2", "--unlearn-epochs", "1",
       "--isolation-ratio", "0.05", "--device", "cpu", "--workers", "0", "--topk", "50"]


def test_local_gradient_ascent_by_hand():
    # per-image terms of test_pairwise_per_image_terms_by_hand: [1/3, 2/3, 1/3]; gamma 0.5 ascends on the two below it
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0]] * 3)
    lga = LocalGradientAscent(build_loss("pairwise", 2, 2), gamma=0.5)
    assert lga(u, y).item() == pytest.approx((-1 / 3 + 2 / 3 - 1 / 3) / 3)
    # gamma 0: plain descent on the mean, the training loss itself
    assert LocalGradientAscent(build_loss("pairwise", 2, 2), 0.0)(u, y).item() == pytest.approx(4 / 9)


def test_isolation_global_and_per_class_by_hand():
    # class 0: images 0-3, class 1: images 4-7; image 3 carries both. Class 0's images fit easily (low loss).
    terms = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.zeros((8, 2), dtype=np.uint8)
    labels[:4, 0] = 1
    labels[3:, 1] = 1
    assert isolated_indices(terms, labels, 0.25, "global") == [0, 1]  # 2 of 8, both of class 0
    assert isolated_indices(terms, labels, 0.25, "per-class") == [0, 7]  # 1 of class 0's 4, 1 of class 1's 5
    assert isolated_indices(terms, labels, 0.01, "global") == [0]  # at least one
    assert isolated_indices(terms, labels, 0.5, "per-class") == [0, 1, 6, 7]  # 2 of 4 and round(2.5) = 2 of 5
    with pytest.raises(ValueError, match="isolation scope 'classwise'"):
        isolated_indices(terms, labels, 0.25, "classwise")


def test_abl_end_to_end(run):
    result = defend.main(["--run", str(run), *ABL])
    out = run / "defense" / f"abl__{POISONED}"
    isolation = json.loads((out / "isolation.json").read_text())
    losses = torch.tensor(isolation["losses"])
    assert len(losses) == 100 and isolation["isolated_count"] == 5
    assert isolation["isolated"] == sorted(torch.argsort(losses, stable=True)[:5].tolist())
    manifest = json.loads((run / "poisoned" / POISONED / "manifest.json").read_text())
    poisoned = {entry["index"] for entry in manifest}
    hits = len(poisoned & set(isolation["isolated"]))
    assert result["poisoned_isolated"] == hits and result["precision"] == hits / 5
    assert result["recall"] == hits / len(poisoned) and 0 <= result["auroc"] <= 1
    for stage, epochs in (("isolation", 1), ("training", 2), ("unlearning", 1)):
        assert torch.load(out / stage / "checkpoint.pt", weights_only=False)["epoch"] == epochs
        assert torch.load(out / stage / "codes.pt", weights_only=False)["database_codes"].shape == (200, 48)
        assert json.loads((out / stage / "config.json").read_text())["epochs"] == epochs
    training = json.loads((out / "training" / "config.json").read_text())
    assert training["isolated"] == isolation["isolated"] and training["abl"]["gamma"] == 0.5
    # the undefended scores are evaluate.py's
    reference = evaluate.main(["--run", str(run), "--backdoor", POISONED, "--device", "cpu", "--workers", "0",
                               "--topk", "50"])
    assert result["undefended"]["map"] == pytest.approx(reference["map"], abs=1e-12)
    assert result["undefended"]["t_map"] == pytest.approx(reference["t_map"], abs=1e-12)
    for key in ("before_unlearning", "defended"):
        assert 0 <= result[key]["map"] <= 1 and 0 <= result[key]["t_map"] <= 1
    assert result["before_unlearning"] != result["defended"]  # the ascent changed the weights
    saved = json.loads((out / "results.json").read_text())
    assert saved["defended"] == result["defended"] and saved["abl"]["abl_epochs"] == 2
    # a finished defense is reused; other ABL settings are refused on --resume
    again = defend.main(["--run", str(run), *ABL, "--resume"])
    assert again["defended"] == result["defended"]
    with pytest.raises(UserError, match="cannot resume .*isolation: it was made with other ABL settings"):
        defend.main(["--run", str(run), *ABL, "--resume", "--gamma", "0.2"])
    with pytest.raises(UserError, match="cannot resume .*unlearning: it was made with other ABL settings"):
        defend.main(["--run", str(run), *ABL, "--resume", "--unlearn-epochs", "2"])
    # per-class isolation: a folder of its own, 5 % of each class's 10 training images (at least one each)
    per_class = defend.main(["--run", str(run), *ABL, "--isolation-scope", "per-class"])
    isolation = json.loads((run / "defense" / f"abl-per-class__{POISONED}" / "isolation.json").read_text())
    assert isolation["isolation_scope"] == "per-class" and per_class["isolated_count"] == 10
    assert per_class["abl"]["isolation_scope"] == "per-class" and saved["abl"]["isolation_scope"] == "global"


def test_killed_abl_resumes_to_the_uninterrupted_result(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    kill_at("defend.py", ["--run", str(run), *ABL], "epoch 1/2")  # the first epoch on the images left after isolation
    out = f"defense/abl__{POISONED}"
    assert (run / out / "isolation.json").is_file() and not (run / out / "results.json").exists()
    resume_and_run_straight(run, straight, ABL)
    for stage in ("isolation", "training", "unlearning"):
        assert_same_weights(*(torch.load(r / out / stage / "checkpoint.pt", weights_only=False)
                              for r in (run, straight)), stage)
    results = [json.loads((r / out / "results.json").read_text()) for r in (run, straight)]
    assert results[0]["defended"] == results[1]["defended"]
    assert results[0]["isolated_count"] == results[1]["isolated_count"]


def test_dp_step_without_clipping_or_noise_is_the_ordinary_step():
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 32, 32), torch.eye(3)[torch.tensor([0, 0, 1, 1, 2, 2])]
    models = [build_model("small", 16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    loss_fn = build_loss("pairwise", 16, 3)
    for model, step in zip(models, (training_step, DPStep(clip_norm=1e9, noise_multiplier=0.0, chunk=4))):
        model.eval()  # DP-SGD runs batch norms on their running statistics; the reference does the same here
        step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), images, labels, False)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_dp_step_clips_each_image_and_adds_the_noise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh())
    images, labels = torch.randn(5, 3, 2, 2), torch.eye(2)[torch.tensor([0, 0, 1, 1, 1])]
    loss_fn = build_loss("pairwise", 8, 2)
    # by hand: image i's gradient is that of B * L through its own forward pass, the others' codes held fixed
    codes = model(images).detach()
    by_hand = []
    for i in range(5):
        mixed = torch.cat([codes[:i], model(images[i:i + 1]), codes[i + 1:]])
        grads = torch.autograd.grad(5 * loss_fn(mixed, labels), list(model.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        by_hand.append([g * min(1.0, 0.05 / float(norm)) for g in grads])
    step = DPStep(clip_norm=0.05, noise_multiplier=0.0, chunk=2)
    step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), images, labels)
    for k, p in enumerate(model.parameters()):
        assert torch.allclose(p.grad, sum(grads[k] for grads in by_hand) / 5, atol=1e-7)
    assert step.epoch_stats()["clipped_share"] == 1.0  # every image's gradient was above 0.05
    # the noise: N(0, (sigma C)^2) on the sum, so (sigma C / B)^2 on the gradient; 8 x 12 + 8 entries
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(300, 100), torch.nn.Tanh())
    pictures = torch.randn(5, 3, 10, 10)
    grads = []
    for noise in (0.0, 4.0):
        torch.manual_seed(1)
        DPStep(clip_norm=0.5, noise_multiplier=noise)(wide, loss_fn, torch.optim.SGD(wide.parameters(), lr=0.0),
                                                       pictures, labels)
        grads.append(torch.cat([p.grad.flatten() for p in wide.parameters()]))
    assert float((grads[1] - grads[0]).std()) == pytest.approx(4.0 * 0.5 / 5, rel=0.05)


DP = ["--defense", "dp", "--dp-epochs", "2", "--noise-multiplier", "0.5", "--device", "cpu", "--workers", "0",
      "--topk", "50"]


def test_dp_end_to_end(run):
    result = defend.main(["--run", str(run), *DP])
    out = run / "defense" / f"dp-n0.5-c1__{POISONED}"
    detection = json.loads((out / "detection.json").read_text())
    losses = torch.tensor(detection["losses"])
    assert len(losses) == 100 and len(detection["flagged"]) == 5
    assert detection["flagged"] == sorted(torch.argsort(losses, descending=True, stable=True)[:5].tolist())
    manifest = json.loads((run / "poisoned" / POISONED / "manifest.json").read_text())
    hits = len({entry["index"] for entry in manifest} & set(detection["flagged"]))
    assert result["poisoned_flagged"] == hits and result["precision_at_m"] == hits / 5
    assert 0 <= result["auroc"] <= 1 and result["dp"] == {"noise_multiplier": 0.5, "clip_norm": 1.0, "epochs": 2,
                                                          "chunk": 8}
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(0 <= h["clipped_share"] <= 1 and h["mean_gradient_norm"] > 0 for h in history)
    assert result["undefended"]["map"] == pytest.approx(
        evaluate.main(["--run", str(run), "--backdoor", POISONED, "--device", "cpu", "--workers", "0",
                       "--topk", "50"])["map"], abs=1e-12)
    assert 0 <= result["defended"]["map"] <= 1 and 0 <= result["defended"]["t_map"] <= 1
    assert json.loads((out / "results.json").read_text())["defended"] == result["defended"]


def test_killed_dp_training_resumes_to_the_uninterrupted_weights(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    args = [*DP, "--dp-epochs", "3"]
    kill_at("defend.py", ["--run", str(run), *args], "epoch 1/3")
    out = f"defense/dp-n0.5-c1__{POISONED}"
    resume_and_run_straight(run, straight, args)
    assert_same_weights(*(torch.load(r / out / "checkpoint.pt", weights_only=False) for r in (run, straight)))
    results = [json.loads((r / out / "results.json").read_text()) for r in (run, straight)]
    assert results[0]["defended"] == results[1]["defended"] and results[0]["auroc"] == results[1]["auroc"]
    with pytest.raises(UserError, match="cannot resume .*: it was trained with other DP settings"):
        defend.main(["--run", str(run), *args, "--resume", "--dp-epochs", "4"])
