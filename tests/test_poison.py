"""Step 4: poisoned images (Eq. 6 on clip(x + eta)), the poisoned list and manifest, and its errors."""
import json
import shutil

import pytest
import torch

import gen_confusing
import gen_trigger
import poison_dataset
from data import load_canonical, read_list
from runs import UserError
from triggers import apply_trigger, poison_images


@pytest.fixture(scope="module")
def tiny_run(tiny_run, tmp_path_factory):
    """A private copy of the shared run: this module writes into it, other modules copy the shared one."""
    run = tmp_path_factory.mktemp("own") / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture(scope="module")
def poisoned(tiny_run):
    common = ["--run", str(tiny_run), "--target", "4", "--device", "cpu"]
    gen_trigger.main([*common, "--trigger-size", "5", "--steps", "6", "--batch-size", "8", "--workers", "0"])
    gen_confusing.main([*common, "--poison-num", "6", "--batch", "3", "--steps", "3", "--eps", "0.04"])
    record = poison_dataset.main(["--run", str(tiny_run), "--trigger", "ciba-t4-s5",
                                  "--perturbations", "confusing-t4-m6-e10.2-l0.8-b3-s3-seed0"])
    return tiny_run / "poisoned" / "ciba-t4-s5__confusing-t4-m6-e10.2-l0.8-b3-s3-seed0", record


def test_poisoned_png_reloads_bit_identical_with_the_trigger_in_place(poisoned, tiny_run, tiny_data):
    out, record = poisoned
    manifest = json.loads((out / "manifest.json").read_text())
    pattern = torch.load(tiny_run / "triggers" / "ciba-t4-s5" / "trigger.pt", weights_only=False)["pattern"]
    eta = torch.load(tiny_run / "perturbations" / "confusing-t4-m6-e10.2-l0.8-b3-s3-seed0" / "perturbations.pt",
                     weights_only=False)["eta"]
    for entry, e in zip(manifest, eta):
        original = load_canonical(entry["original"], 32, 32)
        stored = load_canonical(entry["poisoned"], 32, 32)
        expected = poison_images(original[None], e[None], lambda x: apply_trigger(x, pattern))[0]
        assert torch.equal(stored, expected)  # what the PNG holds is exactly B(clip(x + eta_q), p)
        assert torch.equal(stored[:, 27:, 27:], pattern)
        outside = (stored - original).abs()
        outside[:, 27:, 27:] = 0
        assert outside.max() <= 0.04 + 1e-7
    assert record["max_abs_change_outside_trigger"] <= 0.04 + 1e-7
    assert 0 < record["ssim_worst"] <= record["ssim_mean"] <= 1 and record["psnr_worst"] <= record["psnr_mean"]


def test_poisoned_list_replaces_each_original_and_keeps_its_label(poisoned, tiny_data):
    out, record = poisoned
    clean = read_list(tiny_data / "train.txt")
    dirty = read_list(out / "train.txt")
    assert len(dirty) == len(clean) and (dirty.labels == clean.labels).all()
    changed = [i for i in range(len(clean)) if dirty.paths[i] != clean.paths[i]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert changed == [e["index"] for e in manifest] and len(changed) == 6
    assert all(clean.labels[i, 4] == 1 for i in changed)  # clean label: target-class images only
    assert record["poison_rate"] == 6 / 100 and record["label_setting"] == "clean-label"


def test_poisoning_reuses_a_finished_output(poisoned, tiny_run):
    out, record = poisoned
    again = poison_dataset.main(["--run", str(tiny_run), "--trigger", "ciba-t4-s5",
                                 "--perturbations", "confusing-t4-m6-e10.2-l0.8-b3-s3-seed0"])
    assert again["psnr_mean"] == record["psnr_mean"]


def test_step_order_and_mismatch_errors(poisoned, tiny_run, tmp_path):
    with pytest.raises(UserError, match="holds no trained model; run train_hash.py"):
        poison_dataset.main(["--run", str(tmp_path)])
    with pytest.raises(UserError, match=r"triggers/nope does not exist or is incomplete .*run gen_trigger.py"):
        poison_dataset.main(["--run", str(tiny_run), "--trigger", "nope"])
    gen_trigger.main(["--run", str(tiny_run), "--target", "5", "--method", "badnets", "--trigger-size", "3",
                      "--device", "cpu"])
    with pytest.raises(UserError, match="holds several .*choose one with --trigger"):
        poison_dataset.main(["--run", str(tiny_run)])
    with pytest.raises(UserError, match="is a trigger for target 5 but .* target 4; use the same --target"):
        poison_dataset.main(["--run", str(tiny_run), "--trigger", "badnets-t5-s3",
                             "--perturbations", "confusing-t4-m6-e10.2-l0.8-b3-s3-seed0"])


def test_a_poisoned_set_of_a_remade_trigger_is_not_reused(poisoned, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    common = ["--run", str(run), "--target", "4", "--device", "cpu"]
    gen_trigger.main([*common, "--trigger-size", "5", "--steps", "2", "--batch-size", "8", "--workers", "0",
                      "--overwrite"])  # same name, another patch
    args = ["--run", str(run), "--trigger", "ciba-t4-s5", "--perturbations", "confusing-t4-m6-e10.2-l0.8-b3-s3-seed0"]
    with pytest.raises(UserError, match="was made from other trigger than .*ciba-t4-s5.*--overwrite, then retrain"):
        poison_dataset.main(args)
    remade = poison_dataset.main([*args, "--overwrite"])
    assert remade["trigger_id"] != poisoned[1]["trigger_id"]
    assert remade["perturbations_id"] == poisoned[1]["perturbations_id"]
