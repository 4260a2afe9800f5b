"""IAB's input-aware trigger: the networks, the loss terms by hand, gen_trigger.py --method iab (8-bit output,
reuse, a killed training resumed to the same networks), bad input, and its Table 3 row end to end."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import gen_trigger
import table3
from models.iab import InputAwareNet, InputAwareTrigger, iab_losses
from runs import UserError
from tests.conftest import REPO, kill_at
from triggers import trigger_fingerprint, trigger_transform

SMALL = ["--target", "2", "--method", "iab", "--iab-epochs", "2", "--iab-batch", "16", "--iab-width", "8",
         "--workers", "0", "--device", "cpu"]


def test_networks_compose_the_trigger():
    torch.manual_seed(0)
    trigger = InputAwareTrigger(16, width=4)
    images = torch.rand(3, 3, 16, 16)
    triggered, pattern, mask = trigger(images)
    assert pattern.shape == (3, 3, 16, 16) and mask.shape == (3, 1, 16, 16)
    assert 0 <= pattern.min().item() and pattern.max().item() <= 1 and 0 <= mask.min().item() <= mask.max().item() <= 1
    assert torch.allclose(triggered, (1 - mask) * images + mask * pattern)
    other = images.roll(1, 0)
    crossed, other_pattern, _ = trigger(images, other)
    assert torch.allclose(other_pattern, trigger(other)[1]) and not torch.allclose(crossed, triggered)
    with pytest.raises(UserError, match="the image side must be divisible by 8, not 30"):
        InputAwareNet(30, 3)


class Fixed(torch.nn.Module):
    """A stand-in trigger: pattern = the image, mask = half the image's first channel, no change to the image."""

    def forward(self, images, other=None):
        source = images if other is None else other
        return images, source, source[:, :1] * 0.5


def test_iab_loss_terms_by_hand():
    images = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    model = lambda x: torch.full((len(x), 4), 0.5)  # noqa: E731 (relaxed codes of every image: 0.5)
    anchor = torch.tensor([1.0, 1.0, -1.0, 1.0])
    parts = iab_losses(Fixed(), model, images, anchor, mask_density=0.1)
    assert parts["attack"].item() == pytest.approx(1 - 0.5 * 2 / 4)  # mean(0.5 * h_a) = 0.25
    assert parts["cross"].item() == pytest.approx(0.5)  # clean codes +1: 1 - 0.5
    # ||x - x2|| = sqrt(12); patterns differ as much (ratio 1); masks by sqrt(4 * 0.25) = 1: ratio sqrt(12)
    assert parts["diversity"].item() == pytest.approx(1 + 12 ** 0.5)
    assert parts["mask"].item() == pytest.approx(0.25 - 0.1)  # mean mask: (0 + 0.5) / 2
    with pytest.raises(UserError, match="a batch needs two images"):
        iab_losses(Fixed(), model, images[:1], anchor)


@pytest.fixture()
def run(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned",
                                                                  "backdoor"))
    return copy


def test_gen_trigger_iab_writes_a_reusable_input_aware_trigger(run):
    made = gen_trigger.main(["--run", str(run), *SMALL])
    out = run / "triggers" / "iab-t2-e2-seed0"
    saved = torch.load(out / "trigger.pt", weights_only=False)
    assert saved["kind"] == "input-aware" and (out / "networks.pt").is_file() and (out / "trigger.png").is_file()
    assert not (out / "training-state.pt").exists()
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["attack"] >= 0 for h in history)
    images = torch.rand(4, 3, 32, 32)
    triggered = trigger_transform(saved, run, "cpu")(images)
    assert torch.equal(triggered * 255, (triggered * 255).round())  # 8-bit exact, as the poisoned PNGs
    changes = (triggered - images).flatten(1)
    assert not torch.allclose(changes[0], changes[1], atol=1e-3)  # each image its own trigger
    assert trigger_fingerprint(gen_trigger.main(["--run", str(run), *SMALL])) == trigger_fingerprint(made)
    with pytest.raises(UserError, match="was made with other settings: --iab-lr 0.001 \\(asked 0.01\\)"):
        gen_trigger.main(["--run", str(run), *SMALL, "--iab-lr", "0.01"])


def test_killed_iab_training_resumes_to_the_same_networks(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    args = [*SMALL[:5], "3", *SMALL[6:]]  # --iab-epochs 3
    kill_at("gen_trigger.py", ["--run", str(run), *args], "IAB epoch 1/3")
    out = "triggers/iab-t2-e3-seed0"
    assert (run / out / "training-state.pt").is_file() and not (run / out / "networks.pt").exists()
    resumed = subprocess.run([sys.executable, str(REPO / "gen_trigger.py"), "--run", str(run), *args], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming IAB's networks" in resumed.stdout
    gen_trigger.main(["--run", str(straight), *args])
    a, b = (torch.load(r / out / "networks.pt", weights_only=False)["state"] for r in (run, straight))
    for name, value in b.items():
        assert torch.equal(value, a[name]), name


@pytest.mark.parametrize("flags,message", [
    (["--iab-batch", "1"], "--iab-batch must be at least 2"),
    (["--mask-density", "0"], "--mask-density 0 is outside \\(0, 1\\)"),
    (["--w-div", "-1"], "--w-div must not be negative, got -1.0"),
])
def test_gen_trigger_iab_bad_input(tiny_run, flags, message):
    with pytest.raises(UserError, match=message):
        gen_trigger.main(["--run", str(tiny_run), *SMALL, *flags])


def test_iab_row_of_table3_end_to_end(run, tmp_path):
    result = table3.main(["--run", str(run), "--targets", "2", "--methods", "IAB-PL", "--iab-epochs", "1",
                          "--topk", "100", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "t3")])
    row = result["rows"][0]
    assert row["name"] == "IAB" and row["setting"] == "poison-label" and row["poison_num"] == 5
    assert 0 <= row["t_map"] <= 1
    assert "| IAB | 5% | poison-label |" in (tmp_path / "t3" / "table3.md").read_text()
