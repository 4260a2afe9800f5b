"""figures.py: each figure command writes a non-empty PNG and its data from a tiny run, and says what is missing."""
import csv
import json
import shutil

import pytest
from PIL import Image

import torch

import evaluate
import figures
import gen_confusing
import train_backdoor
from retrieval import hamming_distance, hamming_rank
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
    evaluate.main(["--run", str(run), "--backdoor", POISONED, "--device", "cpu", "--workers", "0", "--topk", "50"])
    return run


def figure_args(run, *extra):
    return ["--run", str(run), "--device", "cpu", "--workers", "0", *extra]


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


def test_tsne_places_every_code_and_reports_the_distances(figure_run):
    made = figures.main(figure_args(figure_run, "--figure", "tsne", "--other-classes", "2", "--per-class", "6"))
    rows = written(made)
    groups = [r["group"] for r in rows]
    confusing = "confusing (confusing-t2-m5-e8-l0.8-b3-s3-seed0)"
    assert groups.count("no perturbation") == 5 and groups.count(confusing) == 5
    assert len(rows) == 5 + 5 + 2 * 6 and all(g.startswith("class ") for g in groups[10:])
    distances = {r["group"]: r for r in csv.DictReader(open(made[-1]))}
    codes = torch.load(figure_run / "clean" / "codes.pt", weights_only=False)
    pert = torch.load(figure_run / "perturbations" / "confusing-t2-m5-e8-l0.8-b3-s3-seed0" / "perturbations.pt",
                      weights_only=False)
    originals = codes["train_codes"][pert["indices"]]
    assert float(distances["no perturbation"]["mean_intra_class_distance"]) == pytest.approx(
        float(hamming_distance(originals, originals).sum() / 20), abs=1e-4)
    with pytest.raises(UserError, match="holds no adversarial or confusing perturbations of target 3"):
        figures.main(figure_args(figure_run, "--figure", "tsne", "--target", "3"))


def test_sweep_figure_draws_the_points_that_exist_and_names_the_missing(figure_run, capsys):
    rows = written(figures.main(figure_args(figure_run, "--figure", "figure4", "--poison-num", "5", "--trigger-size",
                                            "4", "--poison-nums", "3", "5", "--trigger-sizes", "4", "6", "--topk",
                                            "50")))
    result = json.loads((figure_run / "backdoor" / POISONED / "results.json").read_text())
    done = [r for r in rows if r["t_map_mean"]]
    assert [(r["swept"], r["value"], r["method"], r["targets"]) for r in done] == [
        ("poison_num", "5", "Tri", "2"), ("trigger_size", "4", "Tri", "2")]
    assert all(float(r["t_map_mean"]) == pytest.approx(result["t_map"], abs=1e-6) for r in done)
    assert len(rows) == 2 * 3 * 2  # two values per panel, three methods, two panels
    printed = capsys.readouterr().out
    # 8: the base point (Tri+Adv, CIBA missing) counts once, though both panels show it; M 3 and size 6, three each
    assert "8 point(s) not run yet" in printed and "table1.py --runs" in printed and "--poison-num 3" in printed
    commands = [line for line in printed.splitlines() if "table1.py --runs" in line]
    assert len(commands) == 3 and any("--methods Tri+Adv CIBA --poison-num 5 --trigger-size 4" in c for c in commands)
    rows = written(figures.main(figure_args(figure_run, "--figure", "figure4", "--topk", "1000")))
    assert not any(r["t_map_mean"] for r in rows)  # evaluated at R = 50 only: nothing matches R = 1000
    rows = written(figures.main(figure_args(figure_run, "--figure", "figure4", "--poison-num", "5", "--topk", "50",
                                            "--trigger-size", "4", "--targets", "3")))
    assert not any(r["t_map_mean"] for r in rows)  # the only result is of target 2
    assert "table1.py --runs" in (printed := capsys.readouterr().out) and "--targets 3 --methods" in printed


def sweep_table(path, rows, **settings):
    """A table1.json as table1.py writes it, with the settings the sweep reads."""
    made = {"topk": 50, "convention": "empty-zero", "seed": 0, "pert_scale": 1, "augment_poison": False,
            "batch": 20, **settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": made, "rows": rows}))
    return str(path)


def table_row(method, trigger_size, t_map, target=2):
    pert = {"None": None, "Tri": None, "Tri+Adv": "adv", "CIBA": "confusing"}[method]
    return {"method": method, "target": target, "t_map": t_map, "map": 0.5, "poison_num": 5,
            "trigger_size": trigger_size, "eps": 8 / 255 if pert else None, "lam": 0.8 if pert == "confusing" else None}


def test_sweep_figure_takes_its_points_from_committed_tables(figure_run, tmp_path):
    """--table: the rows of table1.json files; another seed, --pert-scale or --topk is not a point of the figure."""
    at4 = sweep_table(tmp_path / "s4" / "table1.json", [table_row("None", 4, 0.1), table_row("Tri", 4, 0.3),
                                                         table_row("CIBA", 4, 0.5), table_row("Tri", 4, 0.3, 3)])
    at6 = sweep_table(tmp_path / "s6" / "table1.json", [table_row("Tri+Adv", 6, 0.7)])
    other = [sweep_table(tmp_path / name / "table1.json", [table_row("Tri", 6, 0.9)], **settings)
             for name, settings in (("seed1", {"seed": 1}), ("k2", {"pert_scale": 2}), ("r1000", {"topk": 1000}))]
    rows = written(figures.main(figure_args(figure_run, "--figure", "figure4", "--poison-num", "5", "--trigger-size",
                                            "4", "--poison-nums", "5", "--trigger-sizes", "4", "6", "--topk", "50",
                                            "--table", at4, at6, *other, "--out", str(tmp_path / "out"))))
    done = {(r["swept"], r["value"], r["method"]): (r["targets"], float(r["t_map_mean"])) for r in rows
            if r["t_map_mean"]}
    assert done == {("poison_num", "5", "Tri"): ("2 3", pytest.approx(0.3)),
                    ("poison_num", "5", "CIBA"): ("2", pytest.approx(0.5)),
                    ("trigger_size", "4", "Tri"): ("2 3", pytest.approx(0.3)),
                    ("trigger_size", "4", "CIBA"): ("2", pytest.approx(0.5)),
                    ("trigger_size", "6", "Tri+Adv"): ("2", pytest.approx(0.7))}
    twice = sweep_table(tmp_path / "again" / "table1.json", [table_row("Tri+Adv", 6, 0.6)])
    with pytest.raises(UserError, match=r"again/table1.json and .*s6/table1.json both hold Tri\+Adv on target 2"):
        figures.main(figure_args(figure_run, "--figure", "figure4", "--topk", "50", "--table", at6, twice))
    with pytest.raises(UserError, match="--table .*nope.json does not exist"):
        figures.main(figure_args(figure_run, "--figure", "figure4", "--table", str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="bad.json is not a table1.json of table1.py"):
        figures.main(figure_args(figure_run, "--figure", "figure4", "--table", str(tmp_path / "bad.json")))
    with pytest.raises(UserError, match="--figure table1 shows one table; give one --table, not 2"):
        figures.main(figure_args(figure_run, "--figure", "table1", "--table", at4, at6))


def test_retrieved_shows_the_top_images_of_both_models(figure_run):
    rows = written(figures.main(figure_args(figure_run, "--figure", "retrieved", "--queries", "2", "--top", "4")))
    assert len(rows) == 2 * 4 * 4
    assert {(r["model"], r["input"]) for r in rows} == {(m, i) for m in ("clean", "backdoored")
                                                         for i in ("clean", "triggered")}
    target = json.loads((figure_run / "clean" / "config.json").read_text())["protocol"]["classes"][2]
    assert all(r["query_label"] != target for r in rows)  # triggered queries are never of the target class
    assert all(r["is_target"] == str(int(r["database_label"] == target)) for r in rows)
    assert [r["rank"] for r in rows[:4]] == ["1", "2", "3", "4"]
    # each row ranks the database by the code of what it shows: the clean query, or the query with the trigger
    args = figures.parse_args(figure_args(figure_run, "--figure", "retrieved"))
    found = figures.attack_codes(figure_run, args, torch.device("cpu"))
    kept = found["clean"]["kept"].tolist()
    for model, shown in (("clean", "clean"), ("backdoored", "triggered")):
        mine = [r for r in rows if (r["model"], r["input"]) == (model, shown)][:4]
        query = int(mine[0]["query"])
        code = found[model]["queries"][query] if shown == "clean" else found[model]["triggered"][kept.index(query)]
        top = hamming_rank(code[None], found[model]["database"], 4)[0].tolist()
        assert [int(r["database_index"]) for r in mine] == top


def test_precision_curves_end_at_the_share_of_relevant_items(figure_run):
    rows = written(figures.main(figure_args(figure_run, "--figure", "pr", "--top-ks", "1", "10", "200")))
    curves = {(r["model"], r["queries"]) for r in rows}
    assert curves == {(m, q) for m in ("clean", "backdoored") for q in ("clean", "triggered")}
    codes = torch.load(figure_run / "clean" / "codes.pt", weights_only=False)
    share = float((codes["database_labels"][:, 2] > 0).float().mean())  # the whole database, within radius K
    for model in ("clean", "backdoored"):
        last = [r for r in rows if (r["model"], r["queries"], r["curve"]) == (model, "triggered", "radius")][-1]
        assert float(last["precision"]) == pytest.approx(share) and float(last["recall"]) == pytest.approx(1.0)
        at_200 = next(r for r in rows if (r["model"], r["queries"], r["curve"], r["x"]) == (model, "triggered",
                                                                                           "top_k", "200"))
        assert float(at_200["precision"]) == pytest.approx(share)  # k capped at the 200 database images
    with pytest.raises(UserError, match="shows one backdoored model; give one --backdoor, not 2"):
        figures.parse_args(["--figure", "pr", "--backdoor", "a", "b"])


@pytest.mark.parametrize("flags,message", [
    (["--other-classes", "-1"], "--other-classes must be 0 or more, got -1"),
    (["--top-ks", "10", "0"], "every --top-ks value must be at least 1, got 0"),
    (["--queries", "0"], "--queries must be at least 1"),
    (["--amplify", "0"], "--amplify must be positive"),
])
def test_figure_flags_out_of_range(flags, message):
    with pytest.raises(UserError, match=message):
        figures.parse_args(flags)


def test_tsne_needs_perturbations_of_one_target(figure_run, tmp_path):
    confusing = "confusing-t2-m5-e8-l0.8-b3-s3-seed0"
    with pytest.raises(UserError, match=f"{confusing} perturbs images of target 2, not 3; drop --target"):
        figures.main(figure_args(figure_run, "--figure", "tsne", "--perturbations", confusing, "--target", "3",
                                 "--out", str(tmp_path)))
    run = tmp_path / "run"
    shutil.copytree(figure_run, run, ignore=shutil.ignore_patterns("backdoor", "poisoned", "figures"))
    gen_confusing.main(["--run", str(run), "--target", "3", "--device", "cpu", "--pert", "adv", "--poison-num", "2",
                        "--steps", "1"])
    with pytest.raises(UserError, match=r"of several targets \(2, 3\); choose one with --target"):
        figures.main(figure_args(run, "--figure", "tsne"))
    (run / "clean" / "codes.pt").unlink()
    with pytest.raises(UserError, match="codes.pt is missing, unreadable or of another checkpoint"):
        figures.main(figure_args(run, "--figure", "tsne", "--target", "3"))


def test_ciba_at_lambda_zero_is_the_tri_adv_model():
    settings = {"poison_num": 60, "trigger_size": 4, "lam": 0.0, "batch": 20, "eps": 8 / 255}
    adv = {"method": "Tri+Adv", "pert": "adv", "poison_num": 60, "trigger_size": 4, "eps": 8 / 255, "lam": 0.0}
    ciba = {**adv, "method": "CIBA", "pert": "confusing", "lam": 0.8, "batch": 20}
    assert figures.is_point(adv, "CIBA", settings) and figures.is_point(adv, "Tri+Adv", settings)
    assert not figures.is_point(adv, "CIBA", {**settings, "lam": 0.8})  # lambda 0.8 is CIBA's own point
    assert figures.is_point(ciba, "CIBA", {**settings, "lam": 0.8}) and not figures.is_point(ciba, "CIBA", settings)
    assert not figures.is_point(adv, "Tri", settings)
    assert not figures.is_point({**adv, "eps": 4 / 255}, "CIBA", settings)


def test_table1_figure_shows_the_attack_and_the_mean_of_each_method(figure_run, tmp_path):
    """From a table1.json: the CIBA row's poisoned images if there is one, else the last attack's; the means."""
    result = json.loads((figure_run / "backdoor" / POISONED / "results.json").read_text())
    rows = [{"method": "None", "target": 2, "target_name": None, "t_map": 0.1, "map": 0.5, "stage": "clean"},
            {"method": "Tri", "target": 2, "target_name": None, "t_map": 0.3, "map": 0.4,
             "stage": result["stage"]},
            {"method": "Tri", "target": 3, "target_name": None, "t_map": 0.5, "map": 0.6,
             "stage": result["stage"]}]
    table = tmp_path / "table1.json"
    table.write_text(json.dumps({"rows": rows}))
    made = figures.main([*figure_args(figure_run), "--figure", "table1", "--table", str(table), "--samples", "2",
                         "--out", str(tmp_path / "figures")])
    data = written(made)
    assert [(r["method"], float(r["t_map"]), float(r["map"]), r["targets"]) for r in data] == \
        [("None", 0.1, 0.5, "1"), ("Tri", pytest.approx(0.4), pytest.approx(0.5), "2")]
    table.write_text(json.dumps({"rows": rows[:1]}))
    with pytest.raises(UserError, match="has no backdoored model \\(only None\\)"):
        figures.main([*figure_args(figure_run), "--figure", "table1", "--table", str(table)])
    with pytest.raises(UserError, match="does not exist; run table1.py --runs"):
        figures.main([*figure_args(figure_run), "--figure", "table1", "--table", str(tmp_path / "none.json")])
