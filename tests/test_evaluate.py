"""Step 6, MAP part: results.json of a run, and reuse of the database codes saved by step 1."""
import json
import shutil

import torch

import evaluate


def test_results_json_and_saved_codes_give_the_same_map(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    reused = evaluate.main(["--run", str(run), "--workers", "0", "--device", "cpu", "--topk", "50"])
    written = json.loads((run / "clean" / "results.json").read_text())
    for key in ("map", "topk", "map_empty_zero", "map_empty_skipped", "n_queries", "convention", "provenance"):
        assert key in written
    assert written["topk"] == 50 and written["n_queries"] == 40 and written["n_database"] == 200
    assert written["map"] == reused["map"] and written["provenance"]["device"] == "cpu"
    # codes of another checkpoint are not trusted: the database is encoded again, with the same result
    codes = torch.load(run / "clean" / "codes.pt", weights_only=False)
    codes["checkpoint_id"] = "another"
    torch.save(codes, run / "clean" / "codes.pt")
    recomputed = evaluate.main(["--run", str(run), "--workers", "0", "--device", "cpu", "--topk", "50"])
    assert recomputed["map_empty_zero"] == reused["map_empty_zero"]
    skipped = evaluate.main(["--run", str(run), "--workers", "0", "--device", "cpu", "--topk", "50",
                             "--convention", "empty-skipped"])
    assert skipped["map"] == skipped["map_empty_skipped"] >= skipped["map_empty_zero"]


def test_stage_database_codes_names_the_step_that_writes_them(tiny_run, tmp_path):
    import pytest

    from models.hash_network import read_clean
    from retrieval import stage_database_codes
    from runs import UserError
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _, checkpoint_id = read_clean(run)
    codes, labels = stage_database_codes(run, "clean", checkpoint_id)
    assert codes.shape == (200, 48) and labels.shape[0] == 200
    with pytest.raises(UserError, match=r"clean/codes.pt is missing or belongs to another checkpoint; write it again "
                                        r"with train_hash.py --run .* --resume"):
        stage_database_codes(run, "clean", "another")
    with pytest.raises(UserError, match=r"backdoor/x/codes.pt is missing .* with train_backdoor.py --run"):
        stage_database_codes(run, "backdoor/x", checkpoint_id)
