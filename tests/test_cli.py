"""Bad input reaches the user as one `error:` line and exit status 2, never a traceback."""
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_script, tiny_train_args


@pytest.fixture
def broken_data(tiny_data, tmp_path):
    """A copy of the tiny data set whose lists the tests then damage."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def assert_user_error(result, *patterns):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for pattern in patterns:
        assert pattern in error_lines[0], error_lines[0]


def train(data, run, *extra):
    return run_script("train_hash.py", *tiny_train_args(data, run, "--epochs", "1", *extra))


def test_missing_image_names_list_file_and_line(broken_data, tmp_path):
    lines = (broken_data / "train.txt").read_text().splitlines()
    lines[6] = "images/nowhere/gone.png " + lines[6].split(" ", 1)[1]
    (broken_data / "train.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(train(broken_data, tmp_path / "run"), "train.txt:7: image not found", "gone.png")
    assert not (tmp_path / "run").exists()


def test_label_vector_of_wrong_length(broken_data, tmp_path):
    lines = (broken_data / "query.txt").read_text().splitlines()
    lines[2] += " 0"
    (broken_data / "query.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(train(broken_data, tmp_path / "run"), "query.txt:3: label vector has 11 values, expected 10")


def test_empty_list(broken_data, tmp_path):
    (broken_data / "database.txt").write_text("")
    assert_user_error(train(broken_data, tmp_path / "run"), "database.txt: the list is empty")


def test_unreadable_image(broken_data, tmp_path):
    path = broken_data / (broken_data / "train.txt").read_text().splitlines()[3].split()[0]
    path.write_bytes(b"\x89PNG but then garbage")
    assert_user_error(train(broken_data, tmp_path / "run"), "train.txt:4: cannot read image")
    assert_user_error(train(broken_data, tmp_path / "run2", "--workers", "1"), "train.txt:4: cannot read image")


def test_unknown_architecture_and_loss(tiny_data, tmp_path):
    assert_user_error(train(tiny_data, tmp_path / "run", "--arch", "alexnet"), "unknown architecture 'alexnet'")
    assert_user_error(train(tiny_data, tmp_path / "run", "--loss", "triplet"), "unknown loss 'triplet'")


def test_resume_with_other_bits_or_architecture(tiny_data, tiny_run):
    assert_user_error(train(tiny_data, tiny_run, "--resume", "--bits", "32"), "cannot resume", "--bits 48 there")
    assert_user_error(train(tiny_data, tiny_run, "--resume", "--arch", "vgg11"), "--arch 'small' there")


def test_evaluate_on_a_run_without_training(tmp_path):
    assert_user_error(run_script("evaluate.py", "--run", str(tmp_path / "none")), "run train_hash.py")


def test_corrupted_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = (run / "clean" / "checkpoint.pt").read_bytes()
    (run / "clean" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(run_script("evaluate.py", "--run", str(run), "--workers", "0"), "truncated or corrupted")


def test_prepare_data_offline_folder_errors(tmp_path):
    assert_user_error(run_script("prepare_data.py", "--dataset", "folder", "--out", str(tmp_path / "o")),
                      "needs --source")
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "lonely.png")
    assert_user_error(run_script("prepare_data.py", "--dataset", "folder", "--source", str(empty), "--out",
                                 str(tmp_path / "o")), "no images found")


def test_image_listed_twice(broken_data, tmp_path):
    lines = (broken_data / "train.txt").read_text().splitlines()
    lines.append(lines[4])
    (broken_data / "train.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(train(broken_data, tmp_path / "run"), f"train.txt:{len(lines)}:", "already listed on line 5")
    assert not (tmp_path / "run").exists()


def test_class_absent_from_the_database(broken_data, tmp_path):
    lines = (broken_data / "database.txt").read_text().splitlines()
    kept = [line for line in lines if line.split()[1:][3] != "1"]  # no database image of class 3
    (broken_data / "database.txt").write_text("\n".join(kept) + "\n")
    assert_user_error(train(broken_data, tmp_path / "run"), "database.txt: no image carries class(es) 3 of the 10")
    assert not (tmp_path / "run").exists()
