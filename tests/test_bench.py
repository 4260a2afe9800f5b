"""The benchmarks run, compare like with like, and say what is wrong with their arguments."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import confusing, map_at_r, train_throughput, trigger
from runs import UserError
from tests.conftest import POISONED


def test_map_benchmark_agrees_with_the_per_query_form(tmp_path):
    out = tmp_path / "map.json"
    record = map_at_r.main(["--sizes", "30x700", "12x2000", "--classes", "5", "40", "--topk", "100",
                            "--bits", "16", "--repeats", "2", "--out", str(out)])
    assert out.is_file() and [r["database"] for r in record["rows"]] == [700, 2000]
    for row in record["rows"]:
        assert row["rankings_identical"] and row["map_difference"] < 1e-12 and 0 < row["map_ours"] < 1
        assert len(row["ours_seconds_each"]) == len(row["numpy_seconds_each"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "10x100", "--classes", "5", "6"], "one per size"),
    (["--sizes", "10by100", "--classes", "5"], "QUERIESxDATABASE"),
    (["--sizes", "0x100", "--classes", "5"], "positive"),
    (["--sizes", "10x100", "--classes", "5", "--flip", "0.7"], "--flip 0.7"),
    (["--sizes", "10x100", "--classes", "5", "--repeats", "0"], "--repeats"),
])
def test_map_benchmark_argument_errors(argv, message):
    with pytest.raises(UserError, match=message):
        map_at_r.main(argv)


def test_confusing_benchmark_matches_the_per_image_loop():
    record = confusing.main(["--poison-num", "6", "--batch", "3", "--steps", "2", "--bits", "16"])
    result = record["result"]
    assert result["objective_max_difference"] < 1e-4 and result["eta_pixels_differing"] < 0.01
    assert result["per_image_seconds"] > 0 and result["batched_seconds"] > 0


def test_trigger_benchmark_matches_one_image_at_a_time():
    record = trigger.main(["--steps", "3", "--batch-size", "4", "--bits", "16"])
    result = record["result"]
    assert result["pattern_max_difference"] < 1e-2  # in pixel units of 1/255
    assert result["distance_max_difference"] == 0
    # the small network at 32 px, 16 bits: multiply-adds per image of the six convolutions
    # (1024*32*27 + 1024*32*288 + 256*64*288 + 256*64*576 + 64*128*576 + 64*128*1152) and of the two linear layers
    # (128*512 + 512*16); the forward and the backward to the input each do them once, 2 FLOP per multiply-add
    multiply_adds = 38_633_472 + 73_728
    assert result["flops_per_image_step"] == result["per_image_flops_per_image_step"] == 4 * multiply_adds
    assert result["per_image_gflops_per_s"] > 0 and result["fastest_convolution_gflops_per_s"] > 0


def test_trigger_benchmark_refuses_a_patch_larger_than_the_image():
    with pytest.raises(UserError, match="--trigger-size 40"):
        trigger.main(["--trigger-size", "40"])


def test_trigger_benchmark_needs_a_timed_layer_call():
    with pytest.raises(UserError, match="--layer-calls must be at least 1, got 0"):
        trigger.main(["--layer-calls", "0"])


def test_training_throughput_benchmark_runs_both_paths(tiny_data):
    record = train_throughput.main(["--data", str(tiny_data), "--images", "64", "--epochs", "1", "--workers", "0",
                                    "--bits", "16", "--device", "cpu"])
    assert set(record["rows"]) == {"plain", "fast"} and record["fast_path"]["cache"] == "memory"
    for row in record["rows"].values():
        assert row["epoch_images_per_s"] > 0 and row["limited_by"] in ("input pipeline", "compute")


def test_training_throughput_benchmark_needs_enough_images(tiny_data):
    with pytest.raises(UserError, match="has 100 training images; --images 500 asks for more"):
        train_throughput.main(["--data", str(tiny_data), "--images", "500", "--device", "cpu"])


def test_fault_injection_finds_every_fault_handled(tmp_path):
    from bench import faults
    record = faults.main(["--kills", "1", "--seed", "3", "--work", str(tmp_path / "work"), "--out",
                          str(tmp_path / "faults.json")])
    kinds = [t["kind"] for t in record["trials"]]
    assert kinds.count("damage") == 5 and kinds.count("kill") == 1
    assert all(t["outcome"] != "FAILED" for t in record["trials"]), record["trials"]
    assert "6 trials, 0 failed." in record["summary"] and (tmp_path / "faults.json").is_file()
    with pytest.raises(UserError, match="is not empty"):
        faults.main(["--work", str(tmp_path / "work")])


def test_noise_as_trigger_checks_each_model_of_the_target(attacked):
    from bench import noise_as_trigger
    from data import open_run_split
    from models.hash_network import load_stage
    from retrieval import targeted_map
    record = noise_as_trigger.main(["--run", str(attacked), "--target", "2", "--topk", "100", "--workers", "0",
                                    "--device", "cpu"])
    assert [r["stage"] for r in record["rows"]] == ["clean", f"backdoor/{POISONED}"]
    assert record["n_queries"] == 36  # 40 queries, 4 of them of the target class
    config, _, model = load_stage(attacked, "clean", "cpu")
    queries = open_run_split(config, "query")
    images = torch.stack([queries[i][0] for i in range(len(queries)) if queries.labels[i, 2] == 0])
    db = torch.load(attacked / "clean" / "codes.pt", weights_only=False)
    with torch.no_grad():
        expected = targeted_map(model.codes(images), 2, db["database_codes"], db["database_labels"], 100)["map"]
    assert record["rows"][0]["t_map_plain"] == pytest.approx(expected, abs=1e-12)
    noisy = noise_as_trigger.noise_transform(8 / 255, 0)(images)
    assert (noisy - images).abs().max() <= 8 / 255 + 1e-6 and torch.equal(noisy * 255, (noisy * 255).round())
    smooth = noise_as_trigger.noise_transform(8 / 255, 0, scale=2)(images) - images
    assert (smooth.diff(dim=-1).abs().mean() < 0.5 * (noisy - images).diff(dim=-1).abs().mean())
    with pytest.raises(UserError, match=r"--eps must be in \(0, 1\] \(pixel units\), got 8.0"):
        noise_as_trigger.parse_args(["--eps", "8"])


def demo_rows(none, tri, ciba, ciba_map, clean_map=0.5):
    """table1.json rows of one target: t-MAP of None, Tri and CIBA, CIBA's MAP."""
    return [{"method": m, "t_map": t, "map": mp, "clean_map": clean_map}
            for m, t, mp in (("None", none, clean_map), ("Tri", tri, 0.5), ("CIBA", ciba, ciba_map))]


@pytest.mark.parametrize("rows,passed", [
    (demo_rows(0.10, 0.30, 0.45, 0.49), [True, True, True]),
    (demo_rows(0.10, 0.50, 0.45, 0.49), [True, False, True]),  # CIBA below Tri
    (demo_rows(0.10, 0.30, 0.39, 0.49), [False, True, True]),  # 29 points above None
    (demo_rows(0.10, 0.30, 0.45, 0.47), [True, True, False]),  # 3 points of MAP lost
    (demo_rows(0.10, 0.30, 0.58, 0.49) + demo_rows(0.10, 0.30, 0.20, 0.49), [False, True, True]),  # mean 39 - 10
])
def test_demo_effect_checks_the_three_claims_on_the_means(tmp_path, rows, passed):
    from bench import demo_effect
    table = tmp_path / "table1.json"
    table.write_text(json.dumps({"rows": rows}))
    argv = ["--table", str(table), "--out", str(tmp_path / "effect.json")]
    if all(passed):
        assert demo_effect.main(argv)["passed"]
    else:
        with pytest.raises(SystemExit, match="1"):
            demo_effect.main(argv)
    record = json.loads((tmp_path / "effect.json").read_text())
    assert [c["passed"] for c in record["claims"]] == passed and record["passed"] == all(passed)


def test_demo_effect_names_what_is_missing(tmp_path):
    from bench import demo_effect
    with pytest.raises(UserError, match="does not exist; run bash run_demo.sh"):
        demo_effect.main(["--table", str(tmp_path / "none.json")])
    table = tmp_path / "table1.json"
    table.write_text(json.dumps({"rows": demo_rows(0.1, 0.3, 0.5, 0.5)[:2]}))
    with pytest.raises(UserError, match="has no CIBA row; run table1.py with --methods None Tri CIBA"):
        demo_effect.main(["--table", str(table)])


def test_trigger_convergence_records_eq7_per_step_for_each_setting(tiny_run, tmp_path):
    from bench import trigger_convergence
    out = tmp_path / "conv.json"
    record = trigger_convergence.main(["--run", str(tiny_run), "--target", "2", "--steps", "10", "--batch-size", "4",
                                       "--step-sizes", "12", "96", "--trigger-sizes", "4", "--workers", "0",
                                       "--device", "cpu", "--out", str(out)])
    assert [(r["trigger_size"], r["step_size"]) for r in record["runs"]] == [(4, 12.0), (4, 96.0)]
    for run in record["runs"]:
        assert len(run["history"]) == 10 and len(run["tenths"]) == 10
        assert all(0 <= d <= 48 for d in run["history"] + [run["queries_plain"], run["queries_triggered"]])
    same_batches = [r["history"][0] for r in record["runs"]]  # step 0: the same batch and mid-grey patch
    assert same_batches[0] == pytest.approx(same_batches[1])
    assert out.exists() and out.with_suffix(".png").exists()
    fixed = trigger_convergence.main(["--run", str(tiny_run), "--target", "2", "--steps", "3", "--batch-size", "4",
                                      "--fixed-batch", "--trigger-sizes", "4", "--workers", "0", "--device", "cpu"])
    assert fixed["fixed_batch"] and len(fixed["runs"][0]["history"]) == 3


def test_perturbation_transfer_measures_the_poisons_in_both_models(attacked):
    from bench import perturbation_transfer
    from evaluate import load_trigger, poison_code_distances
    from models.hash_network import load_stage
    from retrieval import anchor_code
    record = perturbation_transfer.main(["--run", str(attacked), "--target", "2", "--device", "cpu"])
    row, = record["rows"]
    assert row["backdoor"] == POISONED and row["target"] == 2 and row["bystanders"] == []  # no other target
    config, _, victim = load_stage(attacked, f"backdoor/{POISONED}", "cpu")
    clean_config, clean_ckpt, clean_model = load_stage(attacked, "clean", "cpu")
    trigger = load_trigger(attacked / "triggers" / config["trigger"], clean_ckpt["checkpoint_id"])
    for name, model in (("clean", clean_model), ("victim", victim)):
        saved = torch.load(attacked / ("clean" if name == "clean" else f"backdoor/{POISONED}") / "codes.pt",
                           weights_only=False)
        expected = poison_code_distances(model, attacked, config, clean_config, trigger, saved["database_codes"],
                                         saved["database_labels"], "cpu")
        assert {k: row[name][k] for k in expected} == pytest.approx(expected)
    assert row["clean"] != row["victim"]  # each model's own codes and anchor
    db = torch.load(attacked / "clean" / "codes.pt", weights_only=False)
    # the spread of the target class by hand: distances of its database codes to their component vote
    members = db["database_codes"][db["database_labels"][:, 2] > 0].float()
    anchor = torch.where(members.sum(0) >= 0, 1.0, -1.0)
    by_hand = ((members.shape[1] - members @ anchor) / 2)
    assert row["clean"]["class_distance_mean"] == pytest.approx(float(by_hand.mean()))
    assert torch.equal(anchor.to(torch.int8), anchor_code(db["database_codes"], db["database_labels"], 2))
    assert row["clean"]["class_distance_median"] == pytest.approx(float(by_hand.median()))


def test_perturbation_transfer_names_a_run_without_victims(attacked):
    from bench import perturbation_transfer
    with pytest.raises(UserError, match=r"holds no backdoored model with its codes of target 5; train one"):
        perturbation_transfer.main(["--run", str(attacked), "--target", "5", "--device", "cpu"])


def test_perturbation_transfer_measures_the_poisons_in_the_other_targets_tri_victims(attacked_copy):
    import gen_confusing
    import gen_trigger
    import poison_dataset
    import train_backdoor
    from bench import perturbation_transfer
    from evaluate import load_trigger, poison_code_distances
    from models.hash_network import load_stage
    run = attacked_copy
    common = ["--run", str(run), "--target", "1", "--device", "cpu"]
    gen_trigger.main([*common, "--trigger-size", "4", "--steps", "2", "--batch-size", "8", "--workers", "0"])
    pert = gen_confusing.main([*common, "--pert", "none", "--poison-num", "5"])["name"]
    poisoned = poison_dataset.main(["--run", str(run), "--trigger", "ciba-t1-s4", "--perturbations", pert])["name"]
    other = train_backdoor.main(["--run", str(run), "--poisoned", poisoned, "--device", "cpu", "--workers", "0"])["out"]
    rows = {r["backdoor"]: r for r in perturbation_transfer.main(["--run", str(run), "--device", "cpu"])["rows"]}
    assert sorted(rows) == sorted([POISONED, Path(other).name])
    bystander, = rows[POISONED]["bystanders"]  # target 2's poisons in target 1's Tri victim
    assert bystander["backdoor"] == Path(other).name
    config, _, _ = load_stage(run, f"backdoor/{POISONED}", "cpu")
    _, clean_ckpt, _ = load_stage(run, "clean", "cpu")
    _, _, model = load_stage(run, f"backdoor/{Path(other).name}", "cpu")
    codes = torch.load(Path(other) / "codes.pt", weights_only=False)
    clean_config = json.loads((run / "clean" / "config.json").read_text())
    trigger = load_trigger(run / "triggers" / config["trigger"], clean_ckpt["checkpoint_id"])
    expected = poison_code_distances(model, run, config, clean_config, trigger, codes["database_codes"],
                                     codes["database_labels"], "cpu")
    assert {k: bystander[k] for k in expected} == pytest.approx(expected)
    assert rows[Path(other).name]["bystanders"][0]["backdoor"] == POISONED


def test_class_map_splits_evaluate_s_map_by_query_class(attacked_copy):
    import evaluate
    from bench import class_map
    from data import open_run_split
    from models.hash_network import load_stage
    from runs import read_json
    attacked = attacked_copy
    for backdoor in ([], ["--backdoor", POISONED]):
        evaluate.main(["--run", str(attacked), *backdoor, "--workers", "0", "--device", "cpu"])
    record = class_map.main(["--run", str(attacked), "--workers", "0", "--device", "cpu"])
    assert list(record["maps"]) == ["clean", POISONED]
    counts = open_run_split(load_stage(attacked, "clean", "cpu")[0], "query").labels.sum(0)
    for stage, results in (("clean", attacked / "clean" / "results.json"),
                           (POISONED, attacked / "backdoor" / POISONED / "results.json")):
        maps = record["maps"][stage]
        assert maps["all"] == pytest.approx(read_json(results)["map"], abs=1e-12)  # what evaluate.py reported
        per_class = torch.tensor([0.0 if m is None else m for m in maps["per_class"]], dtype=torch.float64)
        assert float((per_class * counts).sum() / counts.sum()) == pytest.approx(maps["all"], abs=1e-12)


def test_class_map_compares_clean_models_of_other_runs(tiny_run, tmp_path):
    from bench import class_map
    from runs import read_json, write_json
    with pytest.raises(UserError, match=r"backdoor/ holds no backdoored model; run train_backdoor.py --run .* or "
                                        r"compare clean models with --other-clean"):
        class_map.main(["--run", str(tiny_run), "--backdoors", "--device", "cpu"])
    record = class_map.main(["--run", str(tiny_run), "--backdoors", "--other-clean", str(tiny_run), "--workers", "0",
                             "--device", "cpu"])
    assert record["maps"][f"{tiny_run}/clean"] == record["maps"]["clean"]  # the same model: no difference
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "clean", other / "clean")
    config = read_json(other / "clean" / "config.json")
    write_json({**config, "data": str(tmp_path / "elsewhere")}, other / "clean" / "config.json")
    with pytest.raises(UserError, match=r"other/clean was trained on other data than .*; compare runs of one data set"):
        class_map.main(["--run", str(tiny_run), "--backdoors", "--other-clean", str(other), "--device", "cpu"])
