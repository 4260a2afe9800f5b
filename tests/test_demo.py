"""The README's main job, end to end: run_demo.sh on photos (a tiny fake Imagenette given as DEMO_SOURCE) and, with
neither photos nor a network, on the synthetic set (steps 0-6, the small Table 1 and its pictures)."""
import json
import os
import subprocess

from tests.conftest import REPO
from tests.test_imagenette import imagenette_tree

OFFLINE = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def run_demo(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_") and k.lower() != "no_proxy"}
    return subprocess.run(["bash", str(REPO / "run_demo.sh")], env={**clean, **OFFLINE, **env}, capture_output=True,
                          text=True, timeout=900)


def test_run_demo_on_photos_from_demo_source(tmp_path):
    source = imagenette_tree(tmp_path / "nette", train=201, val=21)
    env = {"DEMO_SOURCE": str(source), "DEMO_DATA": str(tmp_path / "photos"), "DEMO_RUN": str(tmp_path / "run"),
           "DEMO_EPOCHS": "1", "DEMO_WORKERS": "0", "DEMO_TRIGGER_STEPS": "2", "DEMO_METHODS": "None Tri CIBA",
           "DEMO_IMAGE_SIZE": "32"}
    done = run_demo(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no photos" not in done.stdout
    protocol = json.loads((tmp_path / "photos" / "protocol.json").read_text())
    assert protocol["name"] == "imagenette-demo" and protocol["counts"]["database"] == 2000
    config = json.loads((tmp_path / "run" / "clean" / "config.json").read_text())
    assert (config["arch"], config["image_size"], config["resize_size"]) == ("efficientnet_lite0", 32, 36)
    table = json.loads((tmp_path / "run" / "table1" / "table1.json").read_text())
    assert {row["target_name"] for row in table["rows"]} == {"golf ball"}
    trigger, = (tmp_path / "run" / "triggers").glob("ciba-t8-*/config.json")
    assert json.loads(trigger.read_text())["step_size"] == 96  # the demo's Eq. 7 step, not Table 1's 12
    assert "CIBA's t-MAP at least 30 points above None's" in done.stdout  # bench/demo_effect.py's verdicts
    pictures = list((tmp_path / "run" / "figures").glob("retrieved-ciba-t8-*__confusing-*.png"))
    assert len(pictures) == 1 and f"-> {pictures[0]}" in done.stdout


def test_run_demo_without_photos_or_network_runs_the_synthetic_pipeline(tmp_path):
    env = {"DEMO_DATA": str(tmp_path / "photos"), "DEMO_SYNTHETIC_DATA": str(tmp_path / "data"),
           "DEMO_RUN": str(tmp_path / "run"), "DEMO_EPOCHS": "1", "DEMO_WORKERS": "0", "DEMO_TRIGGER_STEPS": "3",
           "DEMO_METHODS": "None Tri CIBA"}
    done = run_demo(env)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stdout.splitlines() if line.startswith("run_demo.sh: no photos")]
    assert len(said) == 1 and "DEMO_SOURCE=" in said[0] and "pipeline but not the backdoor" in said[0]
    assert "Imagenette could not be downloaded: URLError" in said[0]  # the reason, in the same line
    assert "cannot download" not in done.stderr and not (tmp_path / "photos" / "train.txt").exists()
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
    assert list((tmp_path / "run" / "figures").glob("retrieved-*__confusing-*.png"))
    assert "demo_effect" not in done.stdout and "PASS" not in done.stdout  # no verdict on the synthetic pipeline
    # a second run reuses the trained model and the data set
    again = run_demo(env)
    assert again.returncode == 0 and "already trained" in again.stdout
    assert "epoch 1/1" not in again.stdout and again.stdout.count("is up to date; reusing it") == 3


def test_run_demo_stops_on_a_missing_demo_source(tmp_path):
    done = run_demo({"DEMO_SOURCE": str(tmp_path / "nope.tgz"), "DEMO_RUN": str(tmp_path / "run")})
    assert done.returncode == 2 and f"DEMO_SOURCE={tmp_path / 'nope.tgz'} does not exist" in done.stderr
    assert not (tmp_path / "run").exists()
