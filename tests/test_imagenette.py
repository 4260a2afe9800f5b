"""Imagenette as data: the imagenette-ciba protocol, prepare_data.py --dataset imagenette offline (--source: the
archive or an unpacked tree) and through torchvision's downloader (faked, no network)."""
import tarfile
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

import prepare_data
from data import read_list
from runs import UserError

WNIDS = sorted(prepare_data.IMAGENETTE_WORDS)
SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-224.tar.gz"


def imagenette_tree(root: Path, train: int = 102, val: int = 53) -> Path:
    """torchvision's layout: imagenette2-160/{train,val}/<wnid>/*.JPEG (tiny images, no classes.txt)."""
    tree = root / "imagenette2-160"
    for split, n in (("train", train), ("val", val)):
        for c, wnid in enumerate(WNIDS):
            folder = tree / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 5), (c * 20, i % 256, 7)).save(folder / f"{wnid}_{i}.JPEG")
    return tree


@pytest.fixture(scope="module")
def fake_imagenette(tmp_path_factory) -> Path:
    return imagenette_tree(tmp_path_factory.mktemp("nette"))


def check_imagenette_ciba(out: Path, record: dict, n_train: int, n_val: int) -> None:
    """CIBA's per-class shape: 100 training images and 50 val queries per class, every other image in the database."""
    assert record["name"] == "imagenette-ciba"
    assert record["counts"] == {"train": 1000, "query": 500, "database": 10 * (n_train + n_val) - 500}
    assert record["classes"][8] == "golf ball" and record["classes"][0] == "tench"
    query, train, database = (read_list(out / f"{s}.txt") for s in ("query", "train", "database"))
    assert all("/val/" in p for p in query.paths) and query.labels.sum(0).tolist() == [50] * 10
    assert train.labels.sum(0).tolist() == [100] * 10 and not any("/val/" in p for p in train.paths)
    assert set(train.paths) <= set(database.paths) and not set(query.paths) & set(database.paths)
    assert sum("/val/" in p for p in database.paths) == 10 * (n_val - 50)  # unused val photos are in the database
    for paths, labels in ((train.paths, train.labels), (query.paths, query.labels)):  # label column = folder
        assert all(WNIDS[row.argmax()] in path for path, row in zip(paths, labels))


def test_imagenette_from_an_unpacked_tree(fake_imagenette, tmp_path):
    out = tmp_path / "lists"
    record = prepare_data.main(["--dataset", "imagenette", "--source", str(fake_imagenette), "--out", str(out)])
    check_imagenette_ciba(out, record, 102, 53)


def test_imagenette_from_the_archive_and_the_same_split_again(fake_imagenette, tmp_path):
    archive = tmp_path / "imagenette2-160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_imagenette, arcname="imagenette2-160")
    out = tmp_path / "from-archive"
    record = prepare_data.main(["--dataset", "imagenette", "--source", str(archive), "--out", str(out)])
    check_imagenette_ciba(out, record, 102, 53)
    again = tmp_path / "from-tree"
    prepare_data.main(["--dataset", "imagenette", "--source", str(fake_imagenette), "--out", str(again)])
    names = [[Path(p).name for p in read_list(d / "train.txt").paths] for d in (out, again)]
    assert names[0] == names[1]  # the seeded split depends on the files, not on where they were unpacked


def test_imagenette_download_through_torchvision(monkeypatch, tmp_path):
    import torchvision.datasets

    calls = []

    def fake_download(root, split, size, download):
        calls.append((split, size, download))
        if not (Path(root) / "imagenette2-160").exists():
            imagenette_tree(Path(root), train=101, val=51)

    monkeypatch.setattr(torchvision.datasets, "Imagenette", fake_download)
    out = tmp_path / "downloaded"
    record = prepare_data.main(["--dataset", "imagenette", "--out", str(out)])
    assert calls == [("train", "160px", True), ("val", "160px", True)]
    check_imagenette_ciba(out, record, 101, 51)
    assert all(p.startswith(str(out / "raw" / "imagenette2-160")) for p in read_list(out / "train.txt").paths)


def test_imagenette_offline_says_how_to_give_a_local_copy(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "Imagenette", offline)
    with pytest.raises(UserError, match=r"cannot download Imagenette \(URLError.*--dataset imagenette --source PATH "
                                        r".*imagenette2-160.tgz"):
        prepare_data.main(["--dataset", "imagenette", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "train.txt").exists()


def test_imagenette_demo_keeps_ciba_training_images_and_caps_the_database(tmp_path):
    tree = imagenette_tree(tmp_path, train=210, val=55)  # 110 + 5 photos per class in neither split
    full, demo = tmp_path / "full", tmp_path / "demo"
    prepare_data.main(["--dataset", "imagenette", "--source", str(tree), "--out", str(full)])
    record = prepare_data.main(["--dataset", "imagenette", "--source", str(tree), "--protocol", "imagenette-demo",
                                "--out", str(demo)])
    assert record["counts"] == {"train": 1000, "query": 200, "database": 2000}
    query, train, database = (read_list(demo / f"{s}.txt") for s in ("query", "train", "database"))
    assert read_list(full / "train.txt").paths == train.paths  # the same 1,000 training photos as imagenette-ciba
    assert set(query.paths) <= set(read_list(full / "query.txt").paths)  # its queries, the first 20 of each class
    assert set(train.paths) <= set(database.paths) and not set(query.paths) & set(database.paths)
    assert database.labels.sum(0).tolist() == [200] * 10  # 100 training + 100 other photos per class


def test_imagenette_ciba_needs_50_val_photos_per_class(tmp_path):
    tree = imagenette_tree(tmp_path, train=101, val=49)
    with pytest.raises(UserError, match=r"class 'n01440764' in .*imagenette2-160 has 49 images under val/; protocol "
                                        r"'imagenette-ciba' needs 50 queries"):
        prepare_data.main(["--dataset", "imagenette", "--source", str(tree), "--out", str(tmp_path / "x")])


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="the development copy of Imagenette is not on this machine")
def test_the_real_imagenette_archive_gives_1000_500_12894(tmp_path):
    out = tmp_path / "nette"
    record = prepare_data.main(["--dataset", "folder", "--source", str(SHARED_ARCHIVE), "--protocol",
                                "imagenette-ciba", "--out", str(out)])
    assert record["counts"] == {"train": 1000, "query": 500, "database": 12894}
    assert record["classes"] == [prepare_data.IMAGENETTE_WORDS[w] for w in WNIDS]  # from the archive's classes.txt
    with Image.open(out / read_list(out / "query.txt").paths[0]) as image:
        assert image.size == (224, 224)


def test_the_gpu_check_subset_splits_by_imagenette_ciba(fake_imagenette, tmp_path):
    from bench import gpu_subset
    archive = tmp_path / "subset.tar.gz"
    made = gpu_subset.main(["--source", str(fake_imagenette), "--out", str(archive), "--train", "101", "--val", "52"])
    assert (made["train"], made["val"]) == (1010, 520)
    out = tmp_path / "lists"
    record = prepare_data.main(["--dataset", "imagenette", "--source", str(archive), "--out", str(out)])
    check_imagenette_ciba(out, record, 101, 52)
    with pytest.raises(UserError, match=r"val/n01440764 has 53 images, fewer than 54"):
        gpu_subset.main(["--source", str(fake_imagenette), "--out", str(tmp_path / "x.tar.gz"), "--train", "101", "--val",
                         "54"])
    assert not (tmp_path / "x.tar.gz").exists()
