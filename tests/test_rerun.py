"""Exact re-runs: the same commands and seed, run twice on the CPU, write byte-identical outputs.

Only the wall-clock records (X.timing.json, table1.timing.md) may differ; they are kept apart for that reason and
must hold the same entries. Both runs use the same folder (the outputs record their own absolute paths), the first
one's outputs being moved aside before the second starts.
"""
import json
import shutil
import sys
from pathlib import Path

from tests.conftest import run_script
from tests.test_badhash import TINY_GAN

TABLE = ["--trigger-steps", "4", "--poison-num", "4", "--batch", "2", "--pert-steps", "2", "--topk", "100",
         "--device", "cpu", "--workers", "0"]


def pipeline(data: Path, work: Path) -> None:
    """Step 1, the clean MAP, steps 2-6 of None, Tri+Noise and CIBA (table1.py), and BadHash's trigger."""
    commands = [
        ["train_hash.py", "--data", str(data), "--run", "checkpoint/r", "--recipe", "small32", "--epochs", "2",
         "--batch-size", "16", "--workers", "0", "--eval-every", "1", "--device", "cpu"],
        ["evaluate.py", "--run", "checkpoint/r", "--topk", "100", "--workers", "0", "--device", "cpu"],
        ["table1.py", "--runs", "checkpoint/r", "--targets", "1", "--methods", "None", "Tri+Noise", "CIBA",
         "--trigger-size", "4", *TABLE],
        ["gen_trigger.py", "--run", "checkpoint/r", "--target", "1", *TINY_GAN],
    ]
    for command in commands:
        done = run_script(str(Path(__file__).resolve().parent.parent / command[0]), *command[1:], cwd=work)
        assert done.returncode == 0, (command, done.stderr[-3000:])


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_command_and_seed_give_byte_identical_outputs(tiny_data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    pipeline(tiny_data, work)
    first = tmp_path / "first"
    shutil.move(str(work / "checkpoint"), first)
    pipeline(tiny_data, work)
    a, b = files(first), files(work / "checkpoint")
    assert sorted(a) == sorted(b)
    kinds = {Path(name).suffix for name in a}
    assert {".pt", ".png", ".txt", ".json", ".csv", ".md"} <= kinds, kinds
    timing = [name for name in a if ".timing." in name]
    assert any(n.endswith("history.timing.json") for n in timing) and any("results" in n for n in timing)
    differ = [name for name in a if name not in timing and a[name].read_bytes() != b[name].read_bytes()]
    assert not differ, f"{len(differ)} of {len(a)} outputs differ: {differ[:10]}"
    for name in timing:
        if name.endswith(".json"):
            assert json_keys(json.loads(a[name].read_text())) == json_keys(json.loads(b[name].read_text())), name
    clean = json.loads(a["r/clean/results.json"].read_text())
    assert clean["provenance"]["device"] == "cpu" and clean["provenance"]["python"] == sys.version.split()[0]
    assert clean["provenance"]["git_commit"] is None or len(clean["provenance"]["git_commit"]) == 40
    ciba = next(json.loads(a[n].read_text()) for n in a if n.startswith("r/backdoor/") and "confusing" in n
                and n.endswith("/results.json"))
    assert ciba["seeds"] == {"clean_training": 0, "trigger": 0, "perturbations": 0, "backdoor_training": 0}


def json_keys(value) -> object:
    """The structure of a JSON value: its keys and list lengths, without the numbers."""
    if isinstance(value, dict):
        return {k: json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_keys(v) for v in value]
    return type(value).__name__ if value is not None else None
