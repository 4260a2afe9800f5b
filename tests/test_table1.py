"""Steps 1-6 end to end on synthetic data as a user runs them, and the Table 1 command."""
import csv
import json
import shutil

import pytest

import table1
from runs import UserError
from runs.tables import STEPS
from tests.conftest import run_script, swap_checkpoint_model, tiny_train_args
from tests.test_cli import assert_user_error

SMALL = ["--trigger-steps", "4", "--poison-num", "4", "--batch", "2", "--pert-steps", "2", "--topk", "100",
         "--device", "cpu", "--workers", "0"]


def step(*args):
    done = run_script(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_six_steps_end_to_end_as_scripts(tiny_data, tmp_path):
    run = tmp_path / "run"
    common = ["--run", str(run), "--device", "cpu"]
    step("train_hash.py", *tiny_train_args(tiny_data, run))
    step("gen_trigger.py", *common, "--target", "6", "--trigger-size", "4", "--steps", "4", "--workers", "0")
    step("gen_confusing.py", *common, "--target", "6", "--poison-num", "4", "--batch", "2", "--steps", "2")
    step("poison_dataset.py", "--run", str(run))
    step("train_backdoor.py", *common, "--workers", "0")
    name = "ciba-t6-s4__confusing-t6-m4-e8-l0.8-b2-s2-seed0"
    out = step("evaluate.py", *common, "--workers", "0", "--backdoor", name)
    assert "CIBA" in out and "t-MAP@1000" in out
    results = json.loads((run / "backdoor" / name / "results.json").read_text())
    for key in ("map", "t_map", "clean_map", "map_empty_zero", "map_empty_skipped", "t_map_empty_zero",
                "t_map_empty_skipped"):
        assert 0 <= results[key] <= 1, key
    assert results["method"] == "CIBA" and results["lam"] == 0.8 and results["eps"] == pytest.approx(8 / 255)


@pytest.fixture(scope="module")
def table_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("table") / "run48"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("triggers", "perturbations", "poisoned"))
    return run


def test_table1_writes_the_paper_layout_and_reuses_finished_steps(table_run, tmp_path):
    out = tmp_path / "table"
    args = ["table1.py", "--runs", str(table_run), "--targets", "1", "ring-stripes", "--methods", "CIBA", "None",
            "Tri", "--out", str(out), "--track-trigger-distance", "3", *SMALL]
    ring = json.loads((table_run / "clean" / "config.json").read_text())["protocol"]["classes"].index("ring-stripes")
    first = step(*args)
    assert "epoch 2/2" in first  # two backdoored trainings per target were made
    rows = list(csv.reader((out / "table1.csv").open()))
    assert rows[0] == ["Method", "Metric", "48 bits"]
    assert [r[:2] for r in rows[1:]] == [["None", "t-MAP"], ["Tri", "t-MAP"], ["CIBA", "t-MAP"],
                                         ["None", "MAP"], ["Tri", "MAP"], ["CIBA", "MAP"]]
    targets = list(csv.DictReader((out / "table1_targets.csv").open()))
    assert len(targets) == 6 and {r["target"] for r in targets} == {"1", str(ring)}
    for metric in ("t-MAP", "MAP"):  # the table is the mean over the targets, in %
        for method in ("None", "Tri", "CIBA"):
            values = [float(r["t_map" if metric == "t-MAP" else "map"]) for r in targets if r["method"] == method]
            shown = next(float(r[2]) for r in rows if r[:2] == [method, metric])
            assert shown == pytest.approx(100 * sum(values) / 2, abs=0.006)
    histories = sorted((table_run / "backdoor").glob("*/history.json"))
    assert len(histories) == 4
    for history in histories:  # --track-trigger-distance is passed on to train_backdoor.py
        assert [h["epoch"] for h in json.loads(history.read_text()) if "trigger_distance" in h] == [1, 2]
    none = [r for r in targets if r["method"] == "None"]
    assert all(r["map"] == r["clean_map"] and r["poison_num"] == "0" for r in none)
    markdown = (out / "table1.md").read_text()
    assert "| None | t-MAP |" in markdown and "Per target:" in markdown and "training" not in markdown
    record = json.loads((out / "table1.json").read_text())
    assert record["targets"] == [1, ring] and len(record["rows"]) == 6
    assert not any("seconds" in row for row in record["rows"])  # wall times live apart: a rerun repeats table1.json
    timing = json.loads((out / "table1.timing.json").read_text())["rows"]
    assert [(r["target"], r["method"]) for r in timing] == [(r["target"], r["method"]) for r in record["rows"]]
    for row in timing:
        steps = ("trigger", "evaluation") if row["method"] == "None" else STEPS
        assert sorted(row["seconds"]) == sorted(steps) and all(row["seconds"][s] >= 0 for s in steps), row
    assert "| 48 | CIBA |" in (out / "table1.timing.md").read_text()
    made = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in table_run.rglob("*") if p.is_file()}
    again = step(*args)
    assert "epoch 1/2" not in again and again.count("is up to date; reusing it") == 6
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in table_run.rglob("*") if p.is_file()} == made, \
        "reusing finished steps rewrote a file"
    assert json.loads((out / "table1.timing.json").read_text())["rows"] == timing  # the recorded times are kept
    assert (out / "table1.csv").read_text() == "\n".join(",".join(r) for r in rows) + "\n"


def test_table1_passes_on_the_perturbation_grid_and_the_poison_augmentation(table_run, tmp_path):
    out = tmp_path / "table"
    table1.main(["--runs", str(table_run), "--targets", "1", "--methods", "Tri+Adv", "--pert-scale", "2",
                 "--augment-poison", "--out", str(out), *SMALL])
    row, = json.loads((out / "table1.json").read_text())["rows"]
    assert row["stage"] == "backdoor/ciba-t1-s3__adv-t1-m4-e8-s2-k2-seed0-augment-poison"
    config = json.loads((table_run / row["stage"] / "config.json").read_text())
    assert config["augment_poison"] is True
    assert "perturbations on a 1/2 grid, upsampled, poisoned images augmented" in (out / "table1.md").read_text()


def test_table1_passes_the_trigger_step_size_on_to_eq7(table_run, tmp_path):
    run, out = tmp_path / "run", tmp_path / "table"  # a run of its own: the shared one holds 12/255 triggers
    shutil.copytree(table_run / "clean", run / "clean")
    table1.main(["--runs", str(run), "--targets", "1", "--methods", "None", "--trigger-step-size", "48",
                 "--out", str(out), *SMALL])
    config = json.loads((run / "triggers" / "ciba-t1-s3" / "config.json").read_text())
    assert (config["steps"], config["step_size"]) == (4, 48.0)
    assert "trigger size 3 px (4 steps of 48/255)" in (out / "table1.md").read_text()


def test_table1_refuses_runs_that_differ_in_more_than_bits(table_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(table_run / "clean", other / "clean")
    assert_user_error(run_script("table1.py", "--runs", str(table_run), str(other), *SMALL),
                      "both have 48 bits; give one run per bit length")
    swap_checkpoint_model(other / "clean", bits=64, arch="resnet18")
    config = json.loads((other / "clean" / "config.json").read_text())
    config.update(bits=64, arch="resnet18")
    (other / "clean" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has arch 'resnet18' but .* has 'small'"):
        table1.check_runs([str(table_run), str(other)])


@pytest.mark.parametrize("flags,message", [
    (["--methods", "Tri", "Blend"], "unknown method 'Blend' in --methods"),
    (["--num-targets", "11"], "--num-targets 11 is more than the 10 classes"),
    (["--targets", "12"], "class 12 does not exist; the data set has classes 0 to 9"),
    (["--eps", "0"], "--eps 0.0 is outside (0, 1]"),
    (["--lam", "1.5"], "--lam 1.5 is outside [0, 1]"),
    (["--poison-num", "0"], "--poison-num must be at least 1"),
    (["--pert-scale", "0"], "--pert-scale must be at least 1, got 0"),
    (["--trigger-step-size", "0"], "--trigger-step-size must be positive (pixel units of 255), got 0.0"),
])
def test_table1_bad_flags(table_run, flags, message):
    assert_user_error(run_script("table1.py", "--runs", str(table_run), *SMALL, *flags), message)
