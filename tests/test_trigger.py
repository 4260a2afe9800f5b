"""Step 2: anchor code, trigger injection (Eq. 6), the batched patch optimisation (Eq. 7), gen_trigger.py."""
import json

import pytest
import torch

import gen_trigger
from data import open_run_split
from models import build_model
from retrieval import anchor_code
from runs import UserError
from tests.conftest import run_script
from triggers import apply_trigger, corner_mask, default_trigger_size


def test_anchor_code_by_component_voting_on_a_hand_made_set():
    codes = torch.tensor([[1, 1, -1, 1], [1, -1, -1, 1], [-1, -1, -1, 1], [-1, 1, 1, -1]], dtype=torch.int8)
    labels = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1]])
    # target 0: votes (1, -1, -3, 3) -> (1, -1, -1, 1); target 1: votes (-2, 0, 0, 0) -> ties go to +1
    assert anchor_code(codes, labels, 0).tolist() == [1, -1, -1, 1]
    assert anchor_code(codes, labels, 1).tolist() == [-1, 1, 1, 1]
    with pytest.raises(ValueError, match="no image carries label 2"):
        anchor_code(codes, torch.tensor([[1, 0, 0]] * 4), 2)


def test_trigger_is_placed_exactly_and_only_in_the_mask():
    images = torch.rand(2, 3, 10, 10)
    pattern = torch.rand(3, 3, 3)
    out = apply_trigger(images, pattern)
    mask = corner_mask(10, 3)
    assert torch.equal(out[:, :, 7:, 7:], pattern.expand(2, -1, -1, -1))
    assert torch.equal(out * (1 - mask), images * (1 - mask))
    assert torch.equal(out, images * (1 - mask) + torch.nn.functional.pad(pattern, (7, 0, 7, 0)) * mask)  # Eq. 6
    assert mask.sum() == 9 and mask[0, 0, 9, 9] == 1 and mask[0, 0, 6, 9] == 0
    assert not torch.equal(out, images)  # the input itself is left alone


def test_trigger_size_checks_and_default():
    assert default_trigger_size(224) == 24 and default_trigger_size(32) == 3
    with pytest.raises(UserError, match="--trigger-size 40 does not fit a 32x32 image"):
        apply_trigger(torch.rand(1, 3, 32, 32), torch.rand(3, 40, 40))
    with pytest.raises(UserError, match="--trigger-size 0 does not fit"):
        corner_mask(32, 0)


def test_beta_schedule_of_the_paper_code():
    betas = [gen_trigger.beta_at(step, 100) for step in range(100)]
    assert betas[:50] == [0.1] * 50 and betas[50:60] == [0.2] * 10 and betas[60:70] == [0.3] * 10
    assert betas[70:80] == [0.5] * 10 and betas[80:90] == [0.7] * 10 and betas[90:] == [1.0] * 10


def test_window_means_of_the_first_and_last_steps():
    assert gen_trigger.window_means([4.0, 2.0, 9.0, 9.0, 1.0, 3.0], 1 / 3) == (3.0, 2.0)
    assert gen_trigger.window_means([5.0, 7.0], 0.05) == (5.0, 7.0)  # at least one value each


def test_badnets_patch_is_a_black_and_white_checkerboard():
    board = gen_trigger.checkerboard(4)
    assert board.shape == (3, 4, 4) and set(board.unique().tolist()) == {0.0, 1.0}
    assert board[0].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_batched_step_equals_per_image_gradients():
    """One backward over per-image copies gives what a loop over single images (the public code) gives."""
    torch.manual_seed(0)
    model = build_model("small", 16).eval().requires_grad_(False)
    images, anchor, pattern = torch.rand(5, 3, 32, 32), torch.randint(0, 2, (16,)).float() * 2 - 1, torch.rand(3, 4, 4)
    copies = pattern.expand(5, -1, -1, -1).clone().requires_grad_(True)
    ((16 - torch.tanh(0.3 * model.logits(apply_trigger(images, copies))) @ anchor) / 2).sum().backward()
    for i in range(5):
        single = pattern.clone().requires_grad_(True)
        ((16 - torch.tanh(0.3 * model.logits(apply_trigger(images[i:i + 1], single))) @ anchor) / 2).sum().backward()
        assert torch.allclose(copies.grad[i], single.grad, atol=1e-6)


def test_gen_trigger_writes_a_reusable_8bit_trigger(tiny_run):
    args = ["--run", str(tiny_run), "--target", "2", "--trigger-size", "5", "--steps", "12", "--batch-size", "8",
            "--workers", "0", "--device", "cpu"]
    made = gen_trigger.main(args)
    out = tiny_run / "triggers" / "ciba-t2-s5"
    saved = torch.load(out / "trigger.pt", weights_only=False)
    assert saved["pattern"].shape == (3, 5, 5) and torch.equal(saved["pattern"], made["pattern"])
    assert torch.equal(saved["pattern"] * 255, (saved["pattern"] * 255).round())
    assert saved["pattern"].min() >= 0 and saved["pattern"].max() <= 1
    assert not torch.equal(saved["pattern"], torch.full((3, 5, 5), 128 / 255))  # it moved from mid-grey
    config = json.loads((out / "config.json").read_text())
    assert config["target"] == 2 and len(config["anchor_code"]) == 48 and config["seed"] == 0 and not config["fold_bn"]
    distances = json.loads((out / "history.json").read_text())
    assert config["final_mean_distance"] == distances[-1]  # 5 % of 12 steps: the last step alone
    assert len(distances) == 12 and (out / "trigger.png").is_file()
    again = gen_trigger.main(args)  # reused, not recomputed
    assert torch.equal(again["pattern"], saved["pattern"])
    folded = gen_trigger.main([*args, "--fold-bn", "--overwrite"])  # batch norms folded: the same up to rounding
    assert json.loads((out / "config.json").read_text())["fold_bn"] is True
    assert (folded["pattern"] - saved["pattern"]).abs().max() <= 1 / 255 + 1e-7
    assert config["cache"] == "memory"  # auto on the CPU; the DataLoader reads the same images: the same patch
    read = gen_trigger.main([*args, "--cache", "off", "--overwrite"])
    assert json.loads((out / "config.json").read_text())["cache"] == "off"
    assert torch.equal(read["pattern"], saved["pattern"])
    badnets = gen_trigger.main([*args[:6], "--method", "badnets", "--device", "cpu"])
    assert torch.equal(badnets["pattern"], gen_trigger.checkerboard(5))


def test_gen_trigger_reuses_only_a_trigger_of_these_settings(tiny_run):
    args = ["--run", str(tiny_run), "--target", "3", "--trigger-size", "4", "--steps", "6", "--batch-size", "8",
            "--workers", "0", "--device", "cpu"]
    first = gen_trigger.main(args)
    with pytest.raises(UserError, match=r"ciba-t3-s4 was made with other settings: --steps 6 \(asked 7\); use "
                                        r"--overwrite"):
        gen_trigger.main([*args, "--steps", "7"])
    seeded = gen_trigger.main([*args, "--seed", "1"])  # other batches for Eq. 7: a trigger of its own
    assert first["name"] == "ciba-t3-s4" and seeded["name"] == "ciba-t3-s4-seed1"
    out = tiny_run / "triggers" / "ciba-t3-s4-seed1"
    (out / "config.json").unlink()  # killed before its last file: made again, not reused
    again = gen_trigger.main([*args, "--seed", "1"])
    assert (out / "config.json").is_file() and torch.equal(again["pattern"], seeded["pattern"])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "clean_checkpoint_id": "0123"}))
    with pytest.raises(UserError, match="ciba-t3-s4-seed1 was made from another clean model \\(0123, now "):
        gen_trigger.main([*args, "--seed", "1"])


def test_cached_trigger_batches_are_the_dataloader_batches(tiny_run):
    clean = json.loads((tiny_run / "clean" / "config.json").read_text())
    train_set = open_run_split(clean, "train")
    args = gen_trigger.parse_args(["--run", str(tiny_run), "--steps", "7", "--batch-size", "5", "--workers", "0"])
    cached, mode = gen_trigger.trigger_batches(train_set, clean, args, torch.device("cpu"))
    assert mode == "memory" and len(cached) == 7
    args.cache = "off"
    read, mode = gen_trigger.trigger_batches(train_set, clean, args, torch.device("cpu"))
    assert mode == "off" and len(read) == 7
    pairs = list(zip(cached, read))
    assert len(pairs) == 7 and all(torch.equal(a[0], b[0]) for a, b in pairs)


@pytest.mark.parametrize("flags,message", [
    (["--target", "11"], "class 11 does not exist; the data set has classes 0 to 9"),
    (["--target", "zebra"], "unknown class 'zebra'; known classes: cross-solid"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_gen_trigger_bad_input(tiny_run, flags, message):
    with pytest.raises(UserError, match=message):
        gen_trigger.main(["--run", str(tiny_run), "--device", "cpu", "--workers", "0", *flags])


def test_gen_trigger_before_step_1_names_the_missing_step(tmp_path):
    done = run_script("gen_trigger.py", "--run", str(tmp_path / "nothing"), "--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "holds no trained model; run train_hash.py --run" in done.stderr
