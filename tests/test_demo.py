"""The README's main job, end to end: run_demo.sh on the synthetic default (steps 0-6 and the small Table 1)."""
import json
import os
import subprocess

from tests.conftest import REPO


def test_run_demo_script_end_to_end(tmp_path):
    env = {**os.environ, "DEMO_DATA": str(tmp_path / "data"), "DEMO_RUN": str(tmp_path / "run"), "DEMO_EPOCHS": "1",
           "DEMO_WORKERS": "0", "DEMO_TRIGGER_STEPS": "3", "DEMO_METHODS": "None Tri CIBA"}
    done = subprocess.run(["bash", str(REPO / "run_demo.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "clean" / "results.json").read_text())
    assert results["topk"] == 1000 and 0 < results["map"] <= 1
    assert results["n_queries"] == 300 and results["n_database"] == 2700
    assert results["map_empty_zero"] <= results["map_empty_skipped"]
    assert "MAP@1000" in done.stdout
    table = (tmp_path / "run" / "table1" / "table1.md").read_text()
    assert table in done.stdout
    for row in ("| None | t-MAP |", "| Tri | t-MAP |", "| CIBA | t-MAP |", "| CIBA | MAP |"):
        assert row in table
    picture = tmp_path / "run" / "figures" / "table1.png"
    assert f"-> {picture}" in done.stdout and picture.stat().st_size > 10_000
    # a second run reuses the trained model and the data set
    again = subprocess.run(["bash", str(REPO / "run_demo.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "already trained" in again.stdout
    assert "epoch 1/1" not in again.stdout and again.stdout.count("is up to date; reusing it") == 3
