"""table_defenses.py: every defense against the tiny attacked run's backdoored model, reused on a second call, and
its bad inputs."""
import csv
import json
import shutil

import pytest

import table_defenses
from runs import UserError
from tests.conftest import POISONED

PASSED_ON = ["--clean-images", "20", "--prune-fractions", "0", "1", "--prune-fraction", "0.5", "--fine-tune-epochs",
             "1", "--isolation-epochs", "1", "--abl-epochs", "1", "--unlearn-epochs", "1", "--isolation-ratio", "0.05",
             "--dp-epochs", "1", "--topk", "50"]


@pytest.fixture()
def run(attacked_copy):
    return attacked_copy


def test_defense_table_end_to_end_and_reused(run):
    args = ["--run", str(run), "--device", "cpu", "--workers", "0", "--noise-multipliers", "0.5", "2", *PASSED_ON]
    result = table_defenses.main(args)
    rows = result["rows"]
    assert [(r["defense"], r["setting"].split(",")[0]) for r in rows] == [
        ("fine-pruning", "50% pruned"), ("abl", "gamma 0.5"), ("dp", "noise 0.5"), ("dp", "noise 2")]
    out = run / "defense" / "table"
    abl = json.loads((run / "defense" / f"abl__{POISONED}" / "results.json").read_text())
    dp = json.loads((run / "defense" / f"dp-n2-c1__{POISONED}" / "results.json").read_text())
    assert rows[1]["defended"] == abl["defended"] and rows[3]["defended"] == dp["defended"]
    assert rows[1]["detection"].startswith(f"{abl['poisoned_isolated']} of 5 poisoned isolated")
    assert rows[3]["detection"].startswith(f"{dp['poisoned_flagged']} of 5 poisoned among the 5 highest losses")
    assert all(r["undefended"] == rows[0]["undefended"] for r in rows)
    clean = json.loads((run / "clean" / "config.json").read_text())
    name = clean["protocol"]["classes"][2]
    assert rows[0]["target_name"] == name
    markdown = (out / "defenses.md").read_text()
    assert f"| Tri | 2 ({name}) | dp | noise 2, clip 1, 1 epochs |" in markdown
    assert (out / "defenses.csv").read_text().splitlines()[0].startswith("Attack,Target,Defense,Setting")
    pruning = json.loads((run / "defense" / f"fine-pruning__{POISONED}" / "results.json").read_text())
    points = list(csv.DictReader((out / "pruning-curves.csv").read_text().splitlines()))
    assert [(p["attack"], float(p["fraction"]), float(p["t_map"])) for p in points] == [
        (f"Tri, 2 ({name})", q["fraction"], q["t_map"]) for q in pruning["curve"]]
    assert (out / "pruning-curves.png").stat().st_size > 0
    again = table_defenses.main(args)
    assert (out / "defenses.md").read_text() == markdown and again["rows"][3]["defended"] == rows[3]["defended"]


@pytest.mark.parametrize("flags,message", [
    (["--resume"], "--resume is set by table_defenses.py itself"),
    (["--noise-multiplier", "1"], "--noise-multiplier is set by table_defenses.py itself"),
    (["--isolation-ratio", "2"], "--isolation-ratio 2 is outside"),
    (["--backdoors", "nothing-here"], "nothing-here"),
])
def test_defense_table_bad_input_is_one_error_and_writes_nothing(run, flags, message):
    with pytest.raises(UserError, match=message):
        table_defenses.main(["--run", str(run), "--device", "cpu", "--workers", "0", *PASSED_ON, *flags])
    assert not (run / "defense").exists()


def test_defense_table_needs_a_backdoored_model(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "clean", bare / "clean")
    with pytest.raises(UserError, match="holds no backdoored model; run train_backdoor.py"):
        table_defenses.main(["--run", str(bare), "--device", "cpu", *PASSED_ON])


def test_pruning_curves_name_attacks_that_share_method_and_target_by_their_folder(tmp_path):
    row = {"method": "CIBA", "target": 2, "target_name": "bird"}
    points = [{"fraction": 0.0, "pruned": 0, "map": 0.5, "t_map": 0.4}, {"fraction": 0.5, "pruned": 8, "map": 0.45,
                                                                        "t_map": 0.125}]
    curves = [({**row, "backdoor": "a"}, points), ({**row, "backdoor": "b"}, points[:1]),
              ({**row, "method": "Tri", "backdoor": "c"}, points[1:])]
    table_defenses.write_pruning_curves(curves, tmp_path / "curves")
    lines = list(csv.reader((tmp_path / "curves.csv").read_text().splitlines()))
    assert lines == [["attack", "backdoor", "fraction", "pruned", "map", "t_map"],
                     ["CIBA, 2 (bird): a", "a", "0.0", "0", "0.5", "0.4"],
                     ["CIBA, 2 (bird): a", "a", "0.5", "8", "0.45", "0.125"],
                     ["CIBA, 2 (bird): b", "b", "0.0", "0", "0.5", "0.4"],
                     ["Tri, 2 (bird)", "c", "0.5", "8", "0.45", "0.125"]]
    assert (tmp_path / "curves.png").is_file()
