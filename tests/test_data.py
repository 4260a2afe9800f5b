"""List parsing, canonical loading, the folder builder and the synthetic set."""
import hashlib
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import HashListDataset, image_transform, load_canonical, read_list, save_png
from data.protocols import Protocol, build_lists
from data.synthetic import generate_synthetic
from runs import UserError


def write_images(folder, n=3, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), i * 40, np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def image_dir(tmp_path):
    write_images(tmp_path / "img")
    return tmp_path


def test_reads_multi_hot_labels_and_relative_paths(image_dir):
    (image_dir / "list.txt").write_text("img/0.png 1 0 1\nimg/1.png 0 1 0\n\nimg/2.png 0 0 1\n")
    lst = read_list(image_dir / "list.txt")
    assert lst.labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert lst.paths[0] == str(image_dir / "img/0.png") and lst.line_numbers == [1, 2, 4]


def test_prefix_rewrite_for_lists_from_other_machines(image_dir):
    (image_dir / "list.txt").write_text("/home/someone/imagenet/img/0.png 1 0\n")
    lst = read_list(image_dir / "list.txt", prefix_from="/home/someone/imagenet/", prefix_to="")
    assert lst.paths == [str(image_dir / "img/0.png")]
    with pytest.raises(UserError, match=r"list.txt:1: image not found: /home/someone"):
        read_list(image_dir / "list.txt")


@pytest.mark.parametrize("text,message", [
    ("img/0.png 1 0\nimg/1.png 1 0 0\n", r"list.txt:2: label vector has 3 values, expected 2 \(from line 1\)"),
    ("img/0.png 1 0\nimg/1.png\n", r"list.txt:2: expected 'path label label \.\.\.'"),
    ("img/0.png 1 2\n", r"list.txt:1: labels must be 0 or 1"),
    ("img/0.png 1 x\n", r"list.txt:1: labels must be 0 or 1"),
    ("\n\n", r"list.txt: the list is empty"),
    ("img/0.png 1 0\nimg/9.png 0 1\n", r"list.txt:2: image not found: .*img/9.png \(1 of 2 images missing"),
])
def test_list_errors_name_file_and_line(image_dir, text, message):
    (image_dir / "list.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        read_list(image_dir / "list.txt")


def test_label_width_checked_against_expected_class_count(image_dir):
    (image_dir / "list.txt").write_text("img/0.png 1 0\n")
    with pytest.raises(UserError, match=r"expected 3 \(from --n-classes\)"):
        read_list(image_dir / "list.txt", n_classes=3)
    with pytest.raises(UserError, match="list file not found"):
        read_list(image_dir / "nope.txt")


@pytest.mark.parametrize("size", [32, 224])
def test_canonical_png_round_trip_is_bit_exact(tmp_path, size):
    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    save_png(pixels, tmp_path / "x.png")
    loaded = load_canonical(str(tmp_path / "x.png"), size, resize_size=size * 256 // 224)
    assert torch.equal((loaded * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(pixels))
    # and a float tensor written by save_png reads back to the same 8-bit values
    save_png(loaded, tmp_path / "y.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "y.png")), pixels)


def test_other_sizes_are_resized_then_centre_cropped(tmp_path):
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "big.png")
    assert load_canonical(str(tmp_path / "big.png"), 224, 256).shape == (3, 224, 224)
    for augment in ("resized-crop", "pad-crop", "none"):
        assert image_transform(32, 36, augment)(Image.open(tmp_path / "big.png")).shape == (3, 32, 32)
    with pytest.raises(UserError, match="unknown augmentation"):
        image_transform(32, 32, "mixup")


def test_unreadable_image_names_list_and_line(image_dir):
    (image_dir / "list.txt").write_text("img/0.png 1 0\nimg/1.png 0 1\n")
    png = (image_dir / "img" / "1.png").read_bytes()
    (image_dir / "img" / "1.png").write_bytes(png[:45])  # the header parses, the pixel data is cut
    ds = HashListDataset(read_list(image_dir / "list.txt"), image_transform(8, 8))
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(UserError, match=r"list.txt:2: cannot read image .*1.png"):
        ds[1]
    (image_dir / "img" / "1.png").write_bytes(b"not a png at all")  # caught when the list is read
    (image_dir / "list.txt").write_text("img/0.png 1 0\nimg/1.png 0 1\n\n")  # (a new list file: checked again)
    with pytest.raises(UserError, match=r"list.txt:2: cannot read image .*1.png"):
        read_list(image_dir / "list.txt")


def test_folder_builder_from_tar_gz_is_seeded_and_per_class(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog", "eel"):
            write_images(tmp_path / "tree" / split / name, n=5)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    protocol = Protocol("p", query_per_class=2, train_per_class=3, seed=7)
    record = build_lists(archive, tmp_path / "out", protocol)
    assert record["counts"] == {"train": 9, "query": 6, "database": 24} and record["classes"] == ["cat", "dog", "eel"]
    query = read_list(tmp_path / "out" / "query.txt")
    train = read_list(tmp_path / "out" / "train.txt")
    database = read_list(tmp_path / "out" / "database.txt")
    assert query.labels.sum(0).tolist() == [2, 2, 2] and train.labels.sum(0).tolist() == [3, 3, 3]
    assert not set(query.paths) & set(database.paths) and set(train.paths) <= set(database.paths)
    again = build_lists(tmp_path / "out" / "images", tmp_path / "again", protocol)
    assert again["counts"] == record["counts"]
    other = build_lists(tmp_path / "out" / "images", tmp_path / "other", Protocol("p", 2, 3, seed=8))
    assert read_list(tmp_path / "again" / "query.txt").paths == query.paths
    assert read_list(tmp_path / "other" / "query.txt").paths != query.paths
    assert other["seed"] == 8
    with pytest.raises(UserError, match="has 10 images; protocol 'big' needs 12"):
        build_lists(tmp_path / "out" / "images", tmp_path / "big", Protocol("big", 4, 8))


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "protocol.json":
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_synthetic_set_is_deterministic_and_has_ten_classes(tmp_path, tiny_data):
    again = tmp_path / "again"
    generate_synthetic(again, n_classes=10, per_class=24, size=32, seed=0,
                       protocol=Protocol("tiny", query_per_class=4, train_per_class=10, seed=0))
    assert _digest(again) == _digest(tiny_data)
    assert read_list(tiny_data / "train.txt").n_classes == 10
    other = tmp_path / "other"
    generate_synthetic(other, n_classes=10, per_class=24, size=32, seed=1,
                       protocol=Protocol("tiny", query_per_class=4, train_per_class=10, seed=0))
    assert _digest(other) != _digest(tiny_data)
    with pytest.raises(UserError, match="already exists"):
        generate_synthetic(again, per_class=24, protocol=Protocol("tiny", 4, 10))


def test_synthetic_class_is_not_readable_from_a_single_pixel(tmp_path):
    """A one-pixel Gaussian classifier stays near chance (0.1): position and colours are random per image."""
    out = tmp_path / "syn"
    generate_synthetic(out, n_classes=10, per_class=80, size=32, seed=3, protocol=Protocol("s", 20, 60))
    train, query = read_list(out / "train.txt"), read_list(out / "query.txt")
    x = np.stack([np.asarray(Image.open(p)) for p in train.paths]).reshape(len(train), -1).astype(float)
    xq = np.stack([np.asarray(Image.open(p)) for p in query.paths]).reshape(len(query), -1).astype(float)
    y, yq = train.labels.argmax(1), query.labels.argmax(1)
    mu = np.stack([x[y == c].mean(0) for c in range(10)])  # classes x features
    sd = np.stack([x[y == c].std(0) for c in range(10)]) + 1e-3
    loglik = -((xq[:, None, :] - mu) ** 2) / (2 * sd ** 2) - np.log(sd)  # queries x classes x features
    best = (loglik.argmax(1) == yq[:, None]).mean(0).max()
    assert best < 0.35


def tiny_imagenet_tree(root, n_classes=6, train=7, val=3):
    """A Tiny-ImageNet-shaped tree: train/<wnid>/ and val/<wnid>/ folders and classes.txt (folder, tab, words)."""
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    for wnid in wnids:
        write_images(root / "train" / wnid, n=train)
        write_images(root / "val" / wnid, n=val)
    (root / "classes.txt").write_text("".join(f"{w}\tword{i}, synonym {i}\n" for i, w in enumerate(wnids)))
    return wnids


def test_query_folder_protocol_draws_classes_and_takes_queries_from_val(tmp_path):
    wnids = tiny_imagenet_tree(tmp_path / "tree")
    protocol = Protocol("tin", query_per_class=2, train_per_class=4, classes=4, query_folder="val", seed=0)
    record = build_lists(tmp_path / "tree", tmp_path / "out", protocol)
    # 4 of 6 classes; 2 val images each as queries; 4 training images each; all 7 training images and the val image
    # that is not a query in the database
    assert record["counts"] == {"train": 16, "query": 8, "database": 32}
    assert len(record["class_folders"]) == 4 and set(record["class_folders"]) < set(wnids)
    assert record["class_folders"] == sorted(record["class_folders"])
    assert record["classes"] == [f"word{wnids.index(w)}" for w in record["class_folders"]]  # the first words
    query, train = read_list(tmp_path / "out" / "query.txt"), read_list(tmp_path / "out" / "train.txt")
    database = read_list(tmp_path / "out" / "database.txt")
    assert all("/val/" in p for p in query.paths) and not set(query.paths) & set(database.paths)
    assert sum("/val/" in p for p in database.paths) == 4
    assert set(train.paths) < set(database.paths) and query.labels.sum(0).tolist() == [2] * 4
    for paths, labels in ((train.paths, train.labels), (query.paths, query.labels)):  # label column = folder
        assert all(record["class_folders"][row.argmax()] in path for path, row in zip(paths, labels))
    again = build_lists(tmp_path / "tree", tmp_path / "again", protocol)
    assert again["class_folders"] == record["class_folders"]
    assert read_list(tmp_path / "again" / "train.txt").paths == train.paths
    other = build_lists(tmp_path / "tree", tmp_path / "other", Protocol("tin", 2, 4, classes=4, query_folder="val",
                                                                        seed=5))
    assert other["class_folders"] != record["class_folders"]


def test_query_folder_protocol_errors(tmp_path):
    tiny_imagenet_tree(tmp_path / "tree", n_classes=3)
    with pytest.raises(UserError, match="draws 5 classes but .*tree has 3"):
        build_lists(tmp_path / "tree", tmp_path / "a", Protocol("x", 2, 4, classes=5, query_folder="val"))
    with pytest.raises(UserError, match=r"has 3 images under val/; protocol 'x' needs 4 queries"):
        build_lists(tmp_path / "tree", tmp_path / "b", Protocol("x", 4, 4, query_folder="val"))
    with pytest.raises(UserError, match=r"has 7 images outside val/; protocol 'x' needs 8 training images"):
        build_lists(tmp_path / "tree", tmp_path / "c", Protocol("x", 2, 8, query_folder="val"))
    (tmp_path / "tree" / "classes.txt").write_text("n00000000\tword0\nn00000001 no tab here\n")
    with pytest.raises(UserError, match=r"classes.txt, line 2: expected a folder name, a tab and its words"):
        build_lists(tmp_path / "tree", tmp_path / "d", Protocol("x", 2, 4, query_folder="val"))


def test_repeated_words_are_told_apart_by_folder(tmp_path):
    tiny_imagenet_tree(tmp_path / "tree", n_classes=2)
    (tmp_path / "tree" / "classes.txt").write_text("n00000000\tcrane, bird\nn00000001\tcrane, machine\n")
    record = build_lists(tmp_path / "tree", tmp_path / "out", Protocol("x", 2, 4, query_folder="val"))
    assert record["classes"] == ["crane (n00000000)", "crane (n00000001)"]
