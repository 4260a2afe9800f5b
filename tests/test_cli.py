"""Bad input reaches the user as one `error:` line and exit status 2, never a traceback (in a real process; the
bad-input list of every step is tests/test_bad_input.py)."""
import numpy as np
from PIL import Image

from tests.conftest import run_script, tiny_train_args


def assert_user_error(result, *patterns):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for pattern in patterns:
        assert pattern in error_lines[0], error_lines[0]


def train(data, run, *extra):
    return run_script("train_hash.py", *tiny_train_args(data, run, "--epochs", "1", *extra))


def test_unknown_architecture_and_loss(tiny_data, tmp_path):
    assert_user_error(train(tiny_data, tmp_path / "run", "--arch", "alexnet"), "unknown architecture 'alexnet'")
    assert_user_error(train(tiny_data, tmp_path / "run", "--loss", "triplet"), "unknown loss 'triplet'")


def test_prepare_data_offline_folder_errors(tmp_path):
    assert_user_error(run_script("prepare_data.py", "--dataset", "folder", "--out", str(tmp_path / "o")),
                      "needs --source")
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "lonely.png")
    assert_user_error(run_script("prepare_data.py", "--dataset", "folder", "--source", str(empty), "--out",
                                 str(tmp_path / "o")), "no images found")
