"""The paper's MS-COCO setting: multi-hot labels through the six steps, on a synthetic multi-label set.

Clean-label poisoning draws its M images among those that carry the target label, the anchor code votes over the
training images that carry it, t-MAP triggers the queries without it (a retrieved image is relevant when it carries
it), MAP counts an item relevant when it shares at least one label with the query, and poison-label poisoning gives
its images the target's one-hot label."""
import json

import numpy as np
import pytest
import torch

import evaluate
import gen_confusing
import gen_trigger
import poison_dataset
import prepare_data
import train_backdoor
import train_hash
from data import read_list
from retrieval import hamming_distance, mean_average_precision
from runs import UserError
from tests.conftest import tiny_train_args

TARGET = 1


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "data"
    prepare_data.main(["--dataset", "synthetic", "--max-labels", "3", "--n-classes", "5", "--per-class", "40",
                       "--query-per-class", "6", "--train-per-class", "24", "--out", str(out)])
    return out


def test_the_multi_label_set_has_one_to_three_labels_per_image(multi_data, tmp_path):
    record = json.loads((multi_data / "protocol.json").read_text())
    assert record["counts"] == {"query": 30, "train": 120, "database": 170} and record["max_labels"] == 3
    lists = {s: read_list(multi_data / f"{s}.txt") for s in ("train", "query", "database")}
    for split in lists.values():
        per_image = split.labels.sum(1)
        assert per_image.min() == 1 and per_image.max() == 3
    assert (lists["train"].labels.sum(1) > 1).mean() > 0.4  # most images carry several labels
    assert set(lists["train"].paths) <= set(lists["database"].paths)
    assert not set(lists["query"].paths) & set(lists["database"].paths)
    again = tmp_path / "again"
    prepare_data.main(["--dataset", "synthetic", "--max-labels", "3", "--n-classes", "5", "--per-class", "40",
                       "--query-per-class", "6", "--train-per-class", "24", "--out", str(again)])
    assert (again / "train.txt").read_text() == (multi_data / "train.txt").read_text()  # same seed, same set
    with pytest.raises(UserError, match=r"--max-labels 6: an image carries 1 to --n-classes \(5\) labels"):
        prepare_data.main(["--dataset", "synthetic", "--max-labels", "6", "--n-classes", "5", "--out",
                           str(tmp_path / "x")])


def test_six_steps_on_multi_label_data(multi_data, tmp_path):
    run = tmp_path / "run"
    train_hash.main(tiny_train_args(multi_data, run))
    common = ["--run", str(run), "--target", str(TARGET), "--device", "cpu"]
    trigger = gen_trigger.main([*common, "--trigger-size", "4", "--steps", "3", "--batch-size", "8", "--workers", "0"])
    pert = gen_confusing.main([*common, "--pert", "confusing", "--poison-num", "8", "--batch", "4", "--steps", "2"])
    train = read_list(multi_data / "train.txt")
    chosen = torch.load(run / "perturbations" / pert["name"] / "perturbations.pt", weights_only=False)["indices"]
    assert len(chosen) == 8 and all(train.labels[i, TARGET] for i in chosen)  # clean-label: carriers only
    assert any(train.labels[i].sum() > 1 for i in chosen)  # ... several of them with other labels too

    # the anchor votes over the training images that carry the target, whatever else they carry
    codes = torch.load(run / "clean" / "codes.pt", weights_only=False)
    votes = codes["train_codes"][torch.as_tensor(train.labels[:, TARGET] > 0)].to(torch.int64).sum(0)
    anchor = json.loads((run / "triggers" / trigger["name"] / "config.json").read_text())["anchor_code"]
    assert anchor == [1 if v >= 0 else -1 for v in votes.tolist()]
    single = train.labels.sum(1) == 1  # not the vote of the single-label carriers alone
    assert votes.tolist() != codes["train_codes"][torch.as_tensor(single & (train.labels[:, TARGET] > 0))].to(
        torch.int64).sum(0).tolist()

    poisoned = poison_dataset.main(["--run", str(run)])
    poisoned_list = read_list(run / "poisoned" / poisoned["name"] / "train.txt")
    assert np.array_equal(poisoned_list.labels, train.labels)  # clean-label: every label row as it was
    train_backdoor.main(["--run", str(run), "--device", "cpu", "--workers", "0"])
    result = evaluate.main(["--run", str(run), "--backdoor", poisoned["name"], "--device", "cpu", "--workers", "0"])

    query = read_list(multi_data / "query.txt")
    assert result["t_n_queries"] == int((query.labels[:, TARGET] == 0).sum())  # queries without the target
    assert result["n_queries"] == len(query.paths) and 0 <= result["t_map"] <= 1 and 0 < result["map"] <= 1


def test_poison_label_on_multi_label_data_gives_the_target_one_hot():
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    chosen = gen_confusing.choose_poison_indices(labels, 1, 2, seed=0, list_file="train.txt", setting="poison-label")
    assert sorted(chosen) in ([0, 2], [0, 3], [2, 3])  # only images without target 1
    poisoned = poison_dataset.poisoned_labels(labels, chosen, 1, "poison-label")
    assert all(poisoned[i].tolist() == [0, 1, 0] for i in chosen)
    assert poisoned[1].tolist() == [0, 1, 1]


def test_map_relevance_is_a_shared_label_by_hand():
    # one query with labels {0, 2}; database: {2} (relevant), {1} (not), {0, 1} (relevant), at distances 0, 1, 2
    query = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    database = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    labels_q = torch.tensor([[1, 0, 1]], dtype=torch.uint8)
    labels_db = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.uint8)
    assert hamming_distance(query, database).tolist() == [[0, 1, 2]]
    result = mean_average_precision(query, labels_q, database, labels_db, topk=3)
    assert result["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # relevant at ranks 1 and 3
