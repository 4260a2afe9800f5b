"""The Table 3 command: layout, settings of the rows, reuse of finished steps, bad flags."""
import csv
import json
import shutil

import pytest

from tests.conftest import run_script
from tests.test_cli import assert_user_error
from tests.test_table1 import step

SMALL = ["--trigger-steps", "4", "--batch", "2", "--pert-steps", "2", "--topk", "100", "--device", "cpu",
         "--workers", "0"]


@pytest.fixture(scope="module")
def table3_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("table3") / "run48"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned", "backdoor"))
    return run


def test_table3_writes_the_paper_layout_and_reuses_finished_steps(table3_run, tmp_path):
    out = tmp_path / "table"
    args = ["table3.py", "--run", str(table3_run), "--targets", "4", "--methods", "CIBA-CL", "Blend-PL",
            "BadNets-PL", "--trigger-size", "4", "--out", str(out), *SMALL]
    first = step(*args)
    assert first.count("epoch 2/2") == 3  # one backdoored training per row
    rows = list(csv.reader((out / "table3.csv").open()))
    assert rows[0] == ["Method", "Poisoned rate", "Setting", "t-MAP (%)", "MAP (%)", "PSNR (dB)", "SSIM"]
    assert [r[:3] for r in rows[1:]] == [["Clean-trained", "0%", "-"], ["BadNets", "5%", "poison-label"],
                                         ["Blend", "5%", "poison-label"], ["CIBA", "1%", "clean-label"]]
    targets = {r["method"]: r for r in csv.DictReader((out / "table3_targets.csv").open())}
    assert targets["BadNets-PL"]["poison_num"] == "5" and targets["CIBA-CL"]["poison_num"] == "1"  # of 100
    assert targets["BadNets-PL"]["setting"] == "poison-label" and targets["CIBA-CL"]["setting"] == "clean-label"
    for method, row in zip(("BadNets-PL", "Blend-PL", "CIBA-CL"), rows[2:]):
        assert float(row[3]) == pytest.approx(100 * float(targets[method]["t_map"]), abs=0.006)
        assert float(row[5]) == pytest.approx(float(targets[method]["psnr_mean"]), abs=0.006)
    assert float(rows[1][4]) == pytest.approx(100 * float(targets["CIBA-CL"]["clean_map"]), abs=0.006)
    poisoned = json.loads((table3_run / "poisoned" / "badnets-t4-s4__none-t4-m5-pl-seed0" / "config.json")
                          .read_text())
    assert poisoned["label_setting"] == "poison-label" and poisoned["poison_rate"] == 0.05
    assert "Per target:" in (out / "table3.md").read_text()
    again = step(*args)
    assert "epoch 1/2" not in again and again.count("is up to date; reusing it") == 3
    assert (out / "table3.csv").read_text() == "\n".join(",".join(r) for r in rows) + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--methods", "BadNets-PL", "WaNet"], "unknown method 'WaNet' in --methods"),
    (["--poison-label-rate", "1.5"], "--poison-label-rate 1.5 is outside (0, 1]"),
    (["--clean-label-rate", "0.5", "--methods", "BadNets-CL", "--targets", "1"],
     "has 10 training images of target class 1; --poison-rate 0.5 (50 of 100 images) needs at least that many"),
])
def test_table3_bad_flags(table3_run, flags, message):
    assert_user_error(run_script("table3.py", "--run", str(table3_run), *SMALL, *flags), message)
