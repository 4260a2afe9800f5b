"""Argument checks of the scripts: each bad value gets a message naming it."""
import urllib.error

import pytest
from PIL import Image

import evaluate
import prepare_data
import train_hash
from data.protocols import Protocol
from data.synthetic import generate_synthetic
from runs import UserError, pick_device


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--bits", "0"], "--bits must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--topk", "0"], "--topk must be at least 1"),
    (["--image-size", "64", "--resize-size", "32"], "--resize-size 32 is smaller than --image-size 64"),
    (["--lr", "0"], "learning rates must be positive"),
    (["--arch", "alexnet"], "unknown architecture 'alexnet'"),
    (["--loss", "triplet"], "unknown loss 'triplet'"),
])
def test_train_hash_argument_errors(argv, message):
    with pytest.raises(UserError, match=message):
        train_hash.parse_args(argv)


def test_evaluate_argument_errors():
    with pytest.raises(UserError, match="--topk must be at least 1, got 0"):
        evaluate.parse_args(["--topk", "0"])
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        evaluate.parse_args(["--batch-size", "0"])


def test_device_choice(monkeypatch):
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available on this machine; use --device cpu"):
        pick_device("cuda")


def test_prepare_data_errors(tmp_path):
    with pytest.raises(UserError, match="unknown protocol 'imagenet-xyz'"):
        prepare_data.main(["--protocol", "imagenet-xyz", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="the synthetic set has 2 to 15 classes, asked for 40"):
        prepare_data.main(["--n-classes", "40", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--per-class 20 is smaller than the protocol's 30 queries"):
        prepare_data.main(["--per-class", "20", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="data source not found"):
        prepare_data.main(["--dataset", "folder", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    (tmp_path / "file.zip").write_bytes(b"zip")
    with pytest.raises(UserError, match="expected a folder or a .tar.gz"):
        prepare_data.main(["--dataset", "folder", "--source", str(tmp_path / "file.zip"), "--out", str(tmp_path / "x")])


def test_prepare_data_refuses_to_overwrite_lists(tmp_path):
    out = tmp_path / "syn"
    generate_synthetic(out, per_class=6, protocol=Protocol("t", 2, 3))
    with pytest.raises(UserError, match="already holds list files"):
        prepare_data.main(["--out", str(out)])


def test_cifar10_download_offline_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match=r"cannot download CIFAR-10 .*put cifar-10-python.tar.gz in .*raw/ .*"
                                        r"--dataset folder --source"):
        prepare_data.main(["--dataset", "cifar10", "--out", str(tmp_path / "c10")])


def test_protocol_overrides_are_recorded(tmp_path):
    record = prepare_data.main(["--out", str(tmp_path / "s"), "--per-class", "12", "--query-per-class", "2",
                                "--train-per-class", "5", "--seed", "3"])
    assert record["name"] == "synthetic-custom" and record["seed"] == 3
    assert record["counts"] == {"train": 50, "query": 20, "database": 100}


def test_folder_protocols_are_named_for_their_source(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(_folder(tmp_path / "pets" / name) / f"{i}.png")
    record = prepare_data.main(["--dataset", "folder", "--source", str(tmp_path / "pets"), "--out",
                                str(tmp_path / "a"), "--query-per-class", "1", "--train-per-class", "1"])
    assert record["name"] == "folder-pets-custom" and record["counts"]["train"] == 2
    with pytest.raises(UserError, match="class 'cat' in .*pets has 3 images; protocol 'folder-pets' needs 1100"):
        prepare_data.main(["--dataset", "folder", "--source", str(tmp_path / "pets"), "--out", str(tmp_path / "b")])
    with pytest.raises(UserError, match="unknown protocol 'imagenet'; choose one of cifar10-ciba, cifar10-ciba-100, "
                                        "tinyimagenet-ciba"):
        prepare_data.main(["--dataset", "folder", "--source", str(tmp_path / "pets"), "--protocol", "imagenet",
                           "--out", str(tmp_path / "c")])


def _folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_usage_examples_keep_their_line_breaks():
    """A backslash at the end of a docstring line joins it to the next one (an escaped newline), so a --help that
    shows a two-line command needs `\\\\`; every command of every script's help keeps its lines."""
    import importlib
    import re
    from pathlib import Path
    scripts = sorted(p.stem for p in Path(__file__).resolve().parents[1].glob("*.py"))
    for name in scripts:
        doc = importlib.import_module(name).__doc__ or ""
        for line in doc.splitlines():
            assert not re.search(r"\S {4,}--[a-z]", line), f"{name}.py: usage line joined: {line.strip()}"
