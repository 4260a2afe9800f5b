"""table2.py: Table 1 per hashing loss, assembled one block per loss, and its bad inputs."""
import csv

import pytest

import table2
import train_hash
from runs import UserError
from tests.conftest import tiny_train_args

SMALL = ["--targets", "1", "--methods", "None", "Tri", "--trigger-steps", "4", "--poison-num", "4", "--topk", "100",
         "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def loss_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("table2")
    runs = []
    for loss in ("hashnet", "dch"):
        run = root / loss
        train_hash.main(tiny_train_args(tiny_data, run, "--loss", loss))
        runs.append(str(run))
    return runs


def test_table2_has_one_block_per_loss(loss_runs, tmp_path):
    out = tmp_path / "table2"
    result = table2.main(["--runs", *loss_runs, "--out", str(out), *SMALL])
    assert result["groups"] == {"hashnet": [loss_runs[0]], "dch": [loss_runs[1]]}
    rows = list(csv.reader((out / "table2.csv").open()))
    assert rows[0] == ["Loss", "Method", "Metric", "48 bits"]
    assert [r[:3] for r in rows[1:]] == [[loss, m, metric] for loss in ("hashnet", "dch")
                                         for m, metric in (("None", "t-MAP"), ("Tri", "t-MAP"), ("None", "MAP"),
                                                           ("Tri", "MAP"))]
    for loss in ("hashnet", "dch"):  # each block is that loss's Table 1
        block = list(csv.reader((out / loss / "table1.csv").open()))
        assert [r[1:] for r in rows[1:] if r[0] == loss] == block[1:]
    assert "| dch | Tri | t-MAP |" in (out / "table2.md").read_text()


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "0,1"], "table2.py runs its Table 1 blocks one after the other"),
    (["--poison-num", "0"], "--poison-num must be at least 1"),
])
def test_table2_bad_input_is_one_error(loss_runs, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        table2.main(["--runs", *loss_runs, "--out", str(tmp_path / "t"), *SMALL, *flags])
    assert not (tmp_path / "t").exists()
