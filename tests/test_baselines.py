"""BadNets and Blend of the paper's Table 3 (issue 4): poison-label and clean-label lists, Blend's exact injection,
the poisoning rate."""
import json
import shutil

import pytest
import torch

import gen_confusing
import gen_trigger
import poison_dataset
from data import load_canonical, read_list
from runs import UserError
from triggers import blend, trigger_fingerprint, trigger_transform


@pytest.fixture(scope="module")
def baseline_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("baselines") / "run"
    shutil.copytree(tiny_run, run)
    return run


def poison(run, method, setting, *flags):
    common = ["--run", str(run), "--device", "cpu"]
    trigger = gen_trigger.main([*common, "--target", "2", "--method", method, *flags])
    pert = gen_confusing.main([*common, "--target", "2", "--pert", "none", "--setting", setting,
                               "--poison-rate", "0.05"])
    made = poison_dataset.main([*common, "--trigger", trigger["name"], "--perturbations", pert["name"]])
    return trigger, pert, made


def test_poison_label_relabels_the_poisoned_images_and_clean_label_does_not(baseline_run, tiny_data):
    original = read_list(tiny_data / "train.txt", root=tiny_data)
    for setting in ("poison-label", "clean-label"):
        _, pert, made = poison(baseline_run, "badnets", setting, "--trigger-size", "4")
        assert made["label_setting"] == setting and made["poison_num"] == 5  # 5 % of 100 images
        poisoned = read_list(baseline_run / "poisoned" / made["name"] / "train.txt")
        changed = [i for i in range(len(original)) if (poisoned.labels[i] != original.labels[i]).any()]
        indices = pert["indices"]
        if setting == "poison-label":
            assert all(original.labels[i, 2] == 0 for i in indices)  # drawn among the other classes
            assert changed == indices  # exactly the poisoned images now carry the target's label, only it
            assert all(poisoned.labels[i].tolist() == [0, 0, 1] + [0] * 7 for i in indices)
        else:
            assert all(original.labels[i, 2] == 1 for i in indices) and changed == []
        manifest = json.loads((baseline_run / "poisoned" / made["name"] / "manifest.json").read_text())
        assert [m["index"] for m in manifest] == indices
        assert all(m["original_label"] == original.labels[m["index"]].tolist() for m in manifest)


def test_blend_pattern_and_ratio_are_applied_exactly(baseline_run):
    trigger, pert, made = poison(baseline_run, "blend", "poison-label", "--blend-ratio", "0.3")
    pattern = trigger["pattern"]
    assert trigger["kind"] == "blend" and pattern.shape == (3, 32, 32) and trigger["blend_ratio"] == 0.3
    assert torch.equal(pattern, (pattern * 255).round() / 255) and pattern.std() > 0.2  # 8-bit random noise
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(blend(images, pattern, 0.3), 0.7 * images + 0.3 * pattern)
    applied = trigger_transform(trigger, baseline_run, "cpu")(images)
    assert torch.equal(applied, ((0.7 * images + 0.3 * pattern) * 255).round() / 255)
    manifest = json.loads((baseline_run / "poisoned" / made["name"] / "manifest.json").read_text())
    for entry in manifest:
        x = load_canonical(entry["original"], 32, 32)
        stored = load_canonical(entry["poisoned"], 32, 32)
        assert (stored - (0.7 * x + 0.3 * pattern)).abs().max() <= 0.5 / 255 + 1e-6  # one rounding, nothing else
    assert made["max_abs_change_outside_trigger"] is None
    other = gen_trigger.main(["--run", str(baseline_run), "--device", "cpu", "--target", "2", "--method", "blend",
                              "--blend-ratio", "0.3", "--seed", "1"])
    assert trigger_fingerprint(other) != trigger_fingerprint(trigger)  # another seed, another pattern
    with pytest.raises(UserError, match="the blend pattern is 32x32 px but the images are 16x16"):
        blend(torch.rand(1, 3, 16, 16), pattern, 0.3)


@pytest.mark.parametrize("flags,message", [
    (["--poison-rate", "0.5"], r"has 10 training images of target class 2; --poison-rate 0.5 \(50 of 100 images\)"),
    (["--poison-rate", "0.95", "--setting", "poison-label", "--pert", "none"],
     r"has 90 training images without target label 2; --poison-rate 0.95 \(95 of 100 images\)"),
    (["--poison-rate", "0"], r"--poison-rate 0.0 is outside \(0, 1\]"),
    (["--pert", "confusing", "--setting", "poison-label"], "with --setting poison-label use --pert none or noise"),
])
def test_poisoning_rate_and_setting_errors(baseline_run, flags, message):
    with pytest.raises(UserError, match=message):
        gen_confusing.main(["--run", str(baseline_run), "--device", "cpu", "--target", "2", *flags])
