"""BadHash (issue 4): LabCLN, generator, discriminator, their losses, the LPIPS weights, BadHash through the steps."""
import json
import math
import shutil
import time
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import evaluate
import gen_confusing
import gen_trigger
import poison_dataset
import train_backdoor
from models.badhash import (Discriminator, Generator, LabCLN, build_lpips, hash_attack_loss, labcln_loss, lsgan_loss,
                            nt_xent, smooth_labels)
from runs import UserError
from triggers import badhash as badhash_training
from triggers.badhash import GAN_STATE, badhash_settings

TINY_GAN = ["--method", "badhash", "--labcln-steps", "30", "--labcln-batch", "16", "--gen-epochs", "2",
            "--gen-batch", "25", "--gen-width", "8", "--lpips-weight", "0", "--workers", "0", "--device", "cpu"]


def test_generator_output_shape_and_range():
    torch.manual_seed(0)
    generator = Generator(32, width=8)
    images = torch.rand(5, 3, 32, 32)
    out = generator(images, torch.randn(5, 512) * 10)
    assert out.shape == (5, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert Generator(16, width=4)(torch.rand(2, 3, 16, 16), torch.randn(2, 512)).shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="image size divisible by 16"):
        Generator(40)


def test_discriminator_predicts_labels_and_a_real_fake_score():
    assert Discriminator(32, 10, width=8)(torch.rand(3, 3, 32, 32)).shape == (3, 11)
    assert Discriminator(224, 100, width=4)(torch.rand(1, 3, 224, 224)).shape == (1, 101)


def test_nt_xent_by_hand():
    # pairs (0, 1) and (2, 3); cosines: 0-1 = 1, 0-2 = 1-2 = 0, 0-3 = 1-3 = c, 2-3 = -c with c = 1/sqrt(2)
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    t = 0.5
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1 + math.exp(c / t)))
    row1 = row0
    row2 = -math.log(math.exp(-c / t) / (2 + math.exp(-c / t)))
    row3 = -math.log(math.exp(-c / t) / (2 * math.exp(c / t) + math.exp(-c / t)))
    assert nt_xent(z, t).item() == pytest.approx((row0 + row1 + row2 + row3) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="even number of rows"):
        nt_xent(torch.rand(3, 2))


def test_label_smoothing_lsgan_and_hash_terms_by_hand():
    assert smooth_labels(torch.tensor([[0.0, 1.0, 0.0]]), 0.2)[0].tolist() == pytest.approx([0.1, 0.8, 0.1])
    prediction = torch.tensor([[0.5, 0.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0]])
    assert lsgan_loss(prediction, labels, real=True).item() == pytest.approx((0.25 + 0 + 0) / 3)
    assert lsgan_loss(prediction, labels, real=False).item() == pytest.approx((0.25 + 0 + 1) / 3)
    codes = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert hash_attack_loss(codes, codes).item() == 0.0
    assert hash_attack_loss(-codes, codes).item() == 2.0
    assert hash_attack_loss(torch.tensor([[0.5, -0.5, 0.0, 0.0]]), codes).item() == pytest.approx(0.75)


def test_labcln_codes_of_two_labels_differ_after_a_few_steps():
    torch.manual_seed(0)
    net = LabCLN(n_classes=4, bits=16)
    labels = torch.eye(4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(30):
        parts = labcln_loss(net, labels[torch.randint(4, (32,))])
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
    _, relaxed, probabilities = net(labels)
    codes = torch.where(relaxed >= 0, 1, -1)
    distances = (16 - codes @ codes.T) / 2
    assert distances[~torch.eye(4, dtype=torch.bool)].min() >= 1  # every pair of labels gets its own code
    assert torch.equal(probabilities.argmax(1), torch.arange(4))
    assert set(parts) == {"loss", "contrastive", "classification", "quantization"}


def test_lpips_offline_names_the_file_and_loads_weights_from_the_cache(monkeypatch, tmp_path):
    from torchvision.models import AlexNet_Weights, alexnet
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    with monkeypatch.context() as patch:
        patch.setattr(AlexNet_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
        with pytest.raises(UserError, match=rf"put the file alexnet-owt-7be5be79.pth in {tmp_path}/hub/checkpoints"
                                            r".*--lpips-weight 0"):
            build_lpips("cpu")
    # a weights file in the cache is what LPIPS uses (here random weights saved under the expected name)
    torch.manual_seed(0)
    trunk = alexnet().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(trunk, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    metric = build_lpips("cpu")
    assert torch.equal(metric.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(metric.net.slice5[0].weight, trunk["features.10.weight"])
    images = torch.rand(2, 3, 32, 32)
    assert metric(images, images, normalize=True).abs().max() == 0
    assert (metric(images, images.flip(0), normalize=True) > 0).all()


@pytest.fixture(scope="module")
def badhash_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("badhash") / "run"
    shutil.copytree(tiny_run, run)
    made = gen_trigger.main(["--run", str(run), "--target", "3", *TINY_GAN])
    return run, made


def test_badhash_trigger_writes_networks_samples_and_curves(badhash_run):
    run, made = badhash_run
    net_dir = run / made["generator"].rsplit("/", 1)[0]
    for name in ("labcln.pt", "generator.pt", "discriminator.pt", "samples.png", "losses.png", "history.json",
                 "config.json"):
        assert (net_dir / name).is_file(), name
    history = json.loads((net_dir / "history.json").read_text())
    assert len(history["g_loss"]) == 2 * 4  # 2 epochs of 100 images in batches of 25
    assert history["d_steps"] == [0, 3, 6]  # the discriminator learns on every third step
    assert len(history["labcln"]) == 30
    assert made["kind"] == "generator" and made["label_feature"].shape == (1, 512)
    # a second target reuses the networks and only computes its LabCLN feature
    other = gen_trigger.main(["--run", str(run), "--target", "5", *TINY_GAN])
    assert other["generator_id"] == made["generator_id"]
    assert not torch.equal(other["label_feature"], made["label_feature"])


def test_a_badhash_trigger_times_itself_without_the_networks(badhash_run, tmp_path, monkeypatch):
    """The networks keep their own timing record (table3.py shares it out over the targets); a trigger's record
    must not count them again."""
    run, _ = badhash_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    networks = badhash_training.badhash_networks

    def slow_networks(*args):
        time.sleep(3)
        return networks(*args)
    monkeypatch.setattr(badhash_training, "badhash_networks", slow_networks)
    made = gen_trigger.main(["--run", str(copy), "--target", "6", *TINY_GAN])
    timing = json.loads((copy / "triggers" / made["name"] / "config.timing.json").read_text())
    assert 0 < timing["seconds"] < 3


def test_badhash_through_steps_3_to_6(badhash_run):
    run, made = badhash_run
    common = ["--run", str(run), "--device", "cpu"]
    pert = gen_confusing.main([*common, "--target", "3", "--pert", "none", "--poison-num", "6"])
    poisoned = poison_dataset.main([*common, "--trigger", made["name"], "--perturbations", pert["name"]])
    assert poisoned["label_setting"] == "clean-label" and poisoned["max_abs_change_outside_trigger"] is None
    assert 0 < poisoned["ssim_mean"] < 1
    train_backdoor.main([*common, "--poisoned", poisoned["name"], "--workers", "0"])
    result = evaluate.main([*common, "--workers", "0", "--backdoor", poisoned["name"]])
    written = json.loads((run / "backdoor" / poisoned["name"] / "results.json").read_text())
    assert written["method"] == "BadHash" and written["setting"] == "clean-label" and written["target"] == 3
    for key in ("map", "t_map", "clean_map", "t_map_empty_skipped"):
        assert 0 <= written[key] <= 1, key
    assert written["t_map"] == result["t_map"] and written["t_n_queries"] == 36


def test_badhash_errors(badhash_run, tmp_path):
    run, made = badhash_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    net_dir = copy / made["generator"].rsplit("/", 1)[0]
    # a class no training label carries is unknown to LabCLN
    labcln = torch.load(net_dir / "labcln.pt", weights_only=False)
    labcln["label_set"] = labcln["label_set"][labcln["label_set"][:, 7] == 0]
    torch.save(labcln, net_dir / "labcln.pt")
    with pytest.raises(UserError, match="target 7 is unknown to LabCLN"):
        gen_trigger.main(["--run", str(copy), "--target", "7", *TINY_GAN])
    # a generator of another image size or bit length
    for key, value in (("image_size", 64), ("bits", 32)):
        saved = torch.load(net_dir / "generator.pt", weights_only=False)
        original = saved[key]
        saved[key] = value
        torch.save(saved, net_dir / "generator.pt")
        with pytest.raises(UserError, match=rf"generator for {key} {value} but the clean model .* has {key} "
                                            rf"{original}"):
            gen_trigger.main(["--run", str(copy), "--target", "2", *TINY_GAN])
        saved[key] = original
        torch.save(saved, net_dir / "generator.pt")
    # the trigger notices a generator that changed after it was made
    saved = torch.load(net_dir / "generator.pt", weights_only=False)
    next(iter(saved["state"].values())).add_(1e-3)
    torch.save(saved, net_dir / "generator.pt")
    with pytest.raises(UserError, match="has changed since the trigger was made"):
        evaluate.main(["--run", str(copy), "--device", "cpu", "--workers", "0", "--trigger", made["name"]])


def test_interrupted_badhash_training_resumes_to_the_same_networks(badhash_run, tiny_run, tmp_path, monkeypatch):
    run, made = badhash_run
    fresh = tmp_path / "run"
    shutil.copytree(tiny_run, fresh)
    calls = {"n": 0}

    def interrupting_loss(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # second step of the second epoch (4 steps an epoch)
            raise KeyboardInterrupt
        return hash_attack_loss(*args)
    monkeypatch.setattr(badhash_training, "hash_attack_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        gen_trigger.main(["--run", str(fresh), "--target", "3", *TINY_GAN])
    net_dir = fresh / made["generator"].rsplit("/", 1)[0]
    state = torch.load(net_dir / GAN_STATE, weights_only=False)
    assert state["epoch"] == 1 and state["seconds"] > 0 and not (net_dir / "config.json").exists()
    monkeypatch.setattr(badhash_training, "hash_attack_loss", hash_attack_loss)
    resumed = gen_trigger.main(["--run", str(fresh), "--target", "3", *TINY_GAN])
    timing = json.loads((net_dir / "config.timing.json").read_text())
    assert timing["resumed_after_epoch"] == 1 and timing["seconds"] > state["seconds"]  # both calls counted
    assert not (net_dir / GAN_STATE).exists()
    reference_dir = run / made["generator"].rsplit("/", 1)[0]
    for name in ("generator.pt", "discriminator.pt"):
        ours = torch.load(net_dir / name, weights_only=False)["state"]
        reference = torch.load(reference_dir / name, weights_only=False)["state"]
        assert all(torch.equal(ours[k], reference[k]) for k in reference), name
    assert json.loads((net_dir / "history.json").read_text()) == \
        json.loads((reference_dir / "history.json").read_text())
    assert torch.equal(resumed["label_feature"], made["label_feature"])


def test_badhash_state_of_other_settings_is_refused(tiny_run, tmp_path, monkeypatch):
    fresh = tmp_path / "run"
    shutil.copytree(tiny_run, fresh)
    monkeypatch.setattr(badhash_training, "hash_attack_loss", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        gen_trigger.main(["--run", str(fresh), "--target", "3", *TINY_GAN])
    monkeypatch.setattr(badhash_training, "hash_attack_loss", hash_attack_loss)
    (net_dir,) = (fresh / "triggers").glob("badhash-net-*")
    # no epoch finished yet: nothing to resume, the training starts over
    assert not (net_dir / GAN_STATE).exists()
    state_args = gen_trigger.parse_args(["--run", str(fresh), "--target", "3", *TINY_GAN])
    settings = badhash_settings(state_args, "small")
    torch.save({"settings": {**settings, "w_gan": 2.0}, "clean_checkpoint_id": "x"}, net_dir / GAN_STATE)
    with pytest.raises(UserError, match="interrupted BadHash training with other settings"):
        gen_trigger.main(["--run", str(fresh), "--target", "3", *TINY_GAN])


@pytest.mark.parametrize("flags,message", [
    (["--blend-ratio", "0"], r"--blend-ratio 0.0 is outside \(0, 1\]"),
    (["--lpips-weight", "-1"], "--lpips-weight must not be negative"),
    (["--gen-epochs", "0"], "--gen-epochs must be at least 1"),
])
def test_gen_trigger_bad_badhash_and_blend_flags(flags, message):
    with pytest.raises(UserError, match=message):
        gen_trigger.parse_args(flags)


def test_lsgan_matches_mse_definition():
    prediction, labels = torch.rand(4, 6), torch.rand(4, 5)
    expected = F.mse_loss(prediction, torch.cat([labels, torch.ones(4, 1)], 1))
    assert torch.equal(lsgan_loss(prediction, labels, True), expected)
