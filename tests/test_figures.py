"""figures.py: each figure command writes a non-empty PNG and its data from a tiny run, and says what is missing."""
import csv
import json
import shutil

import pytest
from PIL import Image

import figures
import gen_confusing
import train_backdoor
from runs import UserError
from tests.conftest import POISONED


@pytest.fixture(scope="module")
def figure_run(attacked, tmp_path_factory):
    """The attacked tiny run, retrained with the trigger distance tracked, plus a confusing perturbation set."""
    run = tmp_path_factory.mktemp("figures") / "run"
    shutil.copytree(attacked, run, ignore=shutil.ignore_patterns("backdoor"))
    train_backdoor.main(["--run", str(run), "--device", "cpu", "--workers", "0", "--track-trigger-distance", "10"])
    gen_confusing.main(["--run", str(run), "--target", "2", "--device", "cpu", "--pert", "confusing",
                        "--poison-num", "5", "--batch", "3", "--steps", "3"])
    return run


def written(paths):
    png, table = (next(p for p in paths if p.endswith(suffix)) for suffix in (".png", ".csv"))
    with Image.open(png) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    return list(csv.DictReader(open(table)))


def test_theorem1_figure_plots_every_step_under_the_bound(figure_run):
    made = figures.main(["--run", str(figure_run), "--figure", "theorem1"])
    assert made[0].endswith("theorem1-confusing-t2-m5-e8-l0.8-b3-s3-seed0.png")  # the whole name, dots included
    rows = written(made)
    assert {r["batch"] for r in rows} == {"0", "1"} and len(rows) == 2 * 4  # batches of 3 and 2, 3 steps + final
    assert all(float(r["objective"]) <= float(r["bound"]) + 1e-9 for r in rows)


def test_trigger_distance_figure_has_a_point_per_epoch(figure_run):
    rows = written(figures.main(["--run", str(figure_run), "--figure", "trigger-distance"]))
    assert [(r["backdoor"], r["method"], r["epoch"]) for r in rows] == [(POISONED, "Tri", "1"), (POISONED, "Tri", "2")]


def test_figures_say_what_is_missing(attacked, tmp_path):
    with pytest.raises(UserError, match="recorded the trigger distance; train them with"):
        figures.main(["--run", str(attacked), "--figure", "trigger-distance", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="has no objective per step"):
        figures.main(["--run", str(attacked), "--figure", "theorem1", "--perturbations", POISONED.split("__")[1],
                      "--out", str(tmp_path)])
    with pytest.raises(UserError, match="holds no run"):
        figures.main(["--run", str(tmp_path / "none")])


def test_sample_grid_shows_each_poisoned_image_with_its_quality(figure_run):
    rows = written(figures.main(["--run", str(figure_run), "--figure", "samples", "--samples", "3"]))
    assert [(r["poisoned"], r["method"]) for r in rows] == [(POISONED, "Tri")] * 3
    manifest = {e["index"]: e for e in json.loads((figure_run / "poisoned" / POISONED / "manifest.json").read_text())}
    for r in rows:
        assert float(r["ssim"]) == manifest[int(r["index"])]["ssim"] and 0 < float(r["max_abs_change"]) <= 1
    with pytest.raises(UserError, match="--samples must be at least 1"):
        figures.parse_args(["--samples", "0"])
