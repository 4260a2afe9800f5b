"""Refool's reflection trigger: the shift and blur by hand, the blend of a drawn row, batch invariance,
gen_trigger.py --method reflection, 8-bit exact poisoned files, and its Table 3 row end to end."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import gen_trigger
import table3
from data import open_run_split
from runs import UserError
from triggers import trigger_fingerprint, trigger_transform
from triggers.reflection import GAMMA, REFOOL_SIZE, gaussian_blur, reflect, reflection_draws, shift


def test_shift_moves_down_and_right_with_zeros():
    images = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    moved = shift(images, torch.tensor([[1, 2], [0, 1]]))
    assert moved[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 4, 5], [0, 0, 8, 9]]
    assert moved[1, 0].tolist() == [[0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10], [0, 12, 13, 14]]


def test_gaussian_blur_by_hand():
    delta = torch.zeros(2, 3, 7, 7)
    delta[:, :, 3, 3] = 1
    blurred = gaussian_blur(delta, torch.tensor([0.5, 0.5]))
    w = math.exp(-2)  # 3 taps for sigma 0.5 (radius 1): exp(-t^2 / (2 sigma^2)) = [e^-2, 1, e^-2], normalised
    assert blurred[0, 0, 3, 3].item() == pytest.approx((1 / (1 + 2 * w)) ** 2)
    assert blurred[0, 0, 3, 4].item() == pytest.approx(w / (1 + 2 * w) ** 2)
    assert blurred[0, 0, 2, 4].item() == pytest.approx((w / (1 + 2 * w)) ** 2)
    assert torch.allclose(gaussian_blur(torch.full((2, 3, 8, 8), 0.3), torch.tensor([0.7, 2.0])),
                          torch.full((2, 3, 8, 8), 0.3))


def test_reflect_blends_the_drawn_reflection_in_linear_light():
    torch.manual_seed(0)
    images, reflections = torch.rand(5, 3, 16, 16), (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    draws = reflection_draws(4, seed=3, ghost_rate=1.0)  # every row a ghost
    assert bool(draws["ghost"].all())
    out = reflect(images, reflections, draws)
    pixels = (images * 255).round().long().flatten(1)
    row = int((pixels[2] * draws["weights"][:pixels.shape[1]]).sum() % len(draws["pick"]))
    r = reflections[draws["pick"][row]].float().unsqueeze(0) / 255
    offset = (draws["offsets"][row].float() * 16 / REFOOL_SIZE).round().clamp(min=1).long().view(1, 2)
    a, alpha_t = draws["ghost_alpha"][row], draws["alpha_t"][row]
    layer = a * r + (1 - a) * shift(r, offset)
    expected = (alpha_t * images[2:3] ** GAMMA + (1 - alpha_t) * layer ** GAMMA) ** (1 / GAMMA)
    assert torch.allclose(out[2:3], expected, atol=1e-6)
    assert 0.55 <= float(alpha_t) <= 0.95 and 0.15 <= float(a) <= 0.85
    # an image's reflection does not depend on its batch or its place in it
    assert torch.equal(torch.cat([reflect(images[3:], reflections, draws), reflect(images[:3], reflections, draws)]),
                       torch.cat([out[3:], out[:3]]))
    blurred = reflect(images, reflections, reflection_draws(4, seed=3, ghost_rate=0.0))  # every row focal blur
    assert not torch.allclose(blurred, out)


def test_gen_trigger_reflection_set_and_exact_poisoned_files(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned",
                                                                 "backdoor"))
    args = ["--run", str(run), "--target", "2", "--method", "reflection", "--reflections", "12", "--workers", "0",
            "--device", "cpu"]
    made = gen_trigger.main(args)
    out = run / "triggers" / "reflection-t2-n12-g0.49-seed0"
    saved = torch.load(out / "trigger.pt", weights_only=False)
    assert saved["kind"] == "reflection" and saved["reflections"].dtype == torch.uint8
    assert saved["reflections"].shape == (12, 3, 32, 32) and (out / "trigger.png").is_file()
    config = json.loads((out / "config.json").read_text())
    clean = json.loads((run / "clean" / "config.json").read_text())
    database = open_run_split(clean, "database").image_list
    training = set(open_run_split(clean, "train").image_list.paths)
    index = {path: i for i, path in enumerate(database.paths)}
    assert len(set(config["reflection_paths"])) == 12 and not set(config["reflection_paths"]) & training
    assert all(database.labels[index[p], 2] == 0 for p in config["reflection_paths"])
    assert trigger_fingerprint(gen_trigger.main(args)) == trigger_fingerprint(made)  # reused
    # 5 % poison-label: the poisoned PNGs hold exactly what the trigger makes of the originals
    import gen_confusing
    import poison_dataset
    gen_confusing.main(["--run", str(run), "--target", "2", "--pert", "none", "--setting", "poison-label",
                        "--poison-rate", "0.05", "--device", "cpu"])
    poisoned = poison_dataset.main(["--run", str(run), "--trigger", out.name, "--device", "cpu"])
    manifest = json.loads((run / "poisoned" / poisoned["name"] / "manifest.json").read_text())
    transform = trigger_transform(saved, run, "cpu")
    train = open_run_split(clean, "train")
    for entry in manifest[:3]:
        original = train[entry["index"]][0].unsqueeze(0)
        written = torch.from_numpy(np.array(Image.open(entry["poisoned"]).convert("RGB")))
        assert torch.equal((transform(original)[0] * 255).round().to(torch.uint8).permute(1, 2, 0), written)


@pytest.mark.parametrize("flags,message", [
    (["--ghost-rate", "1.5"], "--ghost-rate 1.5 is outside \\[0, 1\\]"),
    (["--reflections", "0"], "--reflections must be at least 1, got 0"),
    (["--reflections", "5000"], "images outside the training list and the target class; --reflections 5000 needs"),
])
def test_gen_trigger_reflection_bad_input(tiny_run, flags, message):
    with pytest.raises(UserError, match=message):
        gen_trigger.main(["--run", str(tiny_run), "--target", "2", "--method", "reflection", "--device", "cpu",
                          "--workers", "0", *flags])


def test_reflection_row_of_table3_end_to_end(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned",
                                                                 "backdoor"))
    result = table3.main(["--run", str(run), "--targets", "4", "--methods", "Reflection-PL", "--reflections", "12",
                          "--topk", "100",
                          "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "t3")])
    row = result["rows"][0]
    assert row["name"] == "Reflection" and row["setting"] == "poison-label" and row["poison_num"] == 5
    assert 0 <= row["t_map"] <= 1 and 0 < row["psnr_mean"] < 60
    assert "| Reflection | 5% | poison-label |" in (tmp_path / "t3" / "table3.md").read_text()
