"""The training fast path: batched augmentation, the decoded-image cache, and the switches that choose them."""
import argparse
import json
import math

import pytest
import torch
from torchvision import transforms
from torchvision.transforms import functional as TF

import train_hash
from conftest import tiny_train_args
from data import HashListDataset, image_transform, open_split
from data import augment as aug
from data import cache as cache_module
from data.cache import DecodedImages
from models import training
from runs import UserError


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8).float()
    out = aug.random_pad_crop(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))  # 16 / 8 = 2 px
    offsets = set()
    for k in range(64):
        found = [(i, j) for i in range(5) for j in range(5) if torch.equal(out[k], padded[k, :, i:i + 16, j:j + 16])]
        assert len(found) == 1, k
        offsets.add(found[0])
    assert len(offsets) > 15  # offsets spread over the 5 x 5 possible ones


def test_flip_mirrors_about_half_of_the_images_and_leaves_the_rest():
    images = torch.rand(400, 3, 4, 4)
    out = aug.random_flip(images, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped ^ kept).all()) and 150 < int(flipped.sum()) < 250


def test_crop_resize_of_the_whole_image_at_its_own_size_is_the_image():
    images = torch.rand(2, 3, 12, 12)
    out = aug.crop_resize(images, torch.tensor([[0, 0, 12, 12], [0, 0, 12, 12.0]]), 12)
    assert torch.allclose(out, images, atol=1e-6)


def test_crop_resize_equals_torchvision_resized_crop_of_each_image():
    images = torch.rand(3, 3, 40, 40)
    boxes = torch.tensor([[5.0, 8.0, 25.0, 24.0], [0.0, 0.0, 40.0, 40.0], [17.0, 3.0, 40.0, 39.0]])  # x1 y1 x2 y2
    out = aug.crop_resize(images, boxes, 32)
    for image, box, got in zip(images, boxes.int().tolist(), out):
        x1, y1, x2, y2 = box
        expected = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=False)
        assert torch.allclose(got, expected, atol=1e-5)


def test_resized_crop_boxes_follow_torchvision_distribution():
    g = torch.Generator().manual_seed(0)
    boxes = aug.resized_crop_boxes(20000, 64, 48, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all())
    torch.manual_seed(0)
    ref = torch.tensor([transforms.RandomResizedCrop.get_params(torch.empty(3, 64, 48), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(20000)], dtype=torch.float32)  # (top, left, h, w)
    for ours, theirs in ((w * h / (64 * 48), ref[:, 3] * ref[:, 2] / (64 * 48)), (w / h, ref[:, 3] / ref[:, 2]),
                         (boxes[:, 1] / 64, ref[:, 0] / 64), (boxes[:, 0] / 48, ref[:, 1] / 48)):
        assert abs(float(ours.mean() - theirs.mean())) < 0.01
        assert abs(float(ours.std() - theirs.std())) < 0.01


def test_central_crop_fallback_as_torchvision():
    assert aug.central_crop(10, 10) == (0, 0, 10, 10)
    assert aug.central_crop(10, 40) == (0, 13, 10, 13)  # too wide: round(4/3 of the height), centred
    assert aug.central_crop(40, 10) == (13, 0, 13, 10)  # too tall: round(width / (3/4)), centred


def test_cache_holds_the_plain_transform_images_and_replaces_plain_entries(tiny_data):
    train = open_split(str(tiny_data), "train", 32, 32, "pad-crop")
    plain_set = HashListDataset(train.image_list, image_transform(32, 32, "pad-crop"), plain_indices=[3, 7],
                                plain_transform=image_transform(32, 32, "none"))
    cached = DecodedImages(plain_set, 32, 32, "pad-crop", torch.device("cpu"))
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (100, 3, 32, 32)
    evaluation = open_split(str(tiny_data), "train", 32, 32, "none")
    assert torch.equal(cached.images[5].float() / 255, evaluation[5][0])  # ToTensor's values exactly
    order = torch.tensor([7, 0, 3, 5, 1, 2])
    batches = list(cached.batches(order, 4, True, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 32, 32)  # drop_last: 6 -> one batch of 4
    images, labels = batches[0]
    assert torch.equal(images[0], evaluation[7][0]) and torch.equal(images[2], evaluation[3][0])  # not augmented
    assert torch.equal(labels, train.labels[order[:4]])
    last = list(cached.batches(order, 4, False, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert [len(b[0]) for b in last] == [4, 2]


def test_resized_crop_cache_keeps_the_resized_source(tiny_data):
    train = open_split(str(tiny_data), "train", 32, 40, "resized-crop")
    cached = DecodedImages(train, 32, 40, "resized-crop", torch.device("cpu"))
    assert cached.images.shape == (100, 3, 40, 40)
    assert cache_module.cache_bytes(100, 32, 40, "resized-crop") == cached.images.numel()
    images, _ = next(cached.batches(torch.arange(100), 8, True, torch.Generator().manual_seed(0),
                                    torch.device("cpu")))
    assert images.shape == (8, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1


def recipe(**switches):
    return argparse.Namespace(image_size=32, resize_size=32, augment="pad-crop",
                              **{"arch": "small", "amp": "auto", "cache": "auto", "channels_last": "auto", **switches})


def test_auto_switches_on_the_cpu():
    fast = training.resolve_fast_path(recipe(), torch.device("cpu"), 100)
    assert fast == {"amp": False, "cache": training.CPU_CACHE, "channels_last": False,
                    "cache_bytes": 100 * 3 * 32 * 32}
    assert training.resolve_fast_path(recipe(arch="efficientnet_lite0"), torch.device("cpu"), 100)["channels_last"]
    forced = training.resolve_fast_path(recipe(amp="on", cache="off", channels_last="on"), torch.device("cpu"), 100)
    assert forced["amp"] and forced["cache"] == "off" and forced["channels_last"]


def test_a_cache_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(cache_module, "free_bytes", lambda where: 1000)
    assert training.resolve_fast_path(recipe(), torch.device("cpu"), 100)["cache"] == "off"  # auto: dropped
    with pytest.raises(UserError, match=r"--cache memory: the decoded images need 0\.0 GiB.*--cache off"):
        training.resolve_fast_path(recipe(cache="memory"), torch.device("cpu"), 100)


@pytest.mark.parametrize("flags", [["--cache", "off"], ["--cache", "memory", "--amp", "on", "--channels-last", "on"]])
def test_training_runs_and_records_its_fast_path(tiny_data, tmp_path, flags):
    run = tmp_path / "run"
    train_hash.main([*tiny_train_args(tiny_data, run), "--epochs", "1", *flags])
    config = json.loads((run / "clean" / "config.json").read_text())
    assert config["fast_path"]["cache"] == flags[1] and config["fast_path"]["amp"] == ("on" in flags)
    history = json.loads((run / "clean" / "history.json").read_text())
    assert math.isfinite(history[0]["loss"]) and 0 <= history[0]["map"] <= 1
