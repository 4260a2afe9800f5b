"""Claims (runs.claim): two processes asking for the same output make it once; a killed holder leaves no claim."""
import errno
import os
import shutil
import subprocess
import sys

import pytest

from runs import claim, io
from tests.conftest import POISONED, REPO

HOLDER = """
import sys
from pathlib import Path
from runs import claim, io
out = Path(sys.argv[1])
with claim(out):
    print("held", flush=True)
    sys.stdin.readline()
    out.write_text("made")
"""
WAITER = """
import sys
from pathlib import Path
from runs import claim, io
out = Path(sys.argv[1])
with claim(out):
    print(out.read_text() if out.exists() else "missing", flush=True)
"""
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def python(code, out, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def hold(out):
    holder = python(HOLDER, out, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_waits_for_the_holder_and_then_finds_its_output(tmp_path):
    out = tmp_path / "out.txt"
    holder = hold(out)
    waiter = python(WAITER, out)
    said = waiter.stdout.readline()
    assert f"{out} is being made by pid {holder.pid} on " in said and "waiting for it to finish" in said
    holder.communicate("go\n", timeout=120)
    assert holder.returncode == 0
    assert waiter.communicate(timeout=120)[0].strip() == "made" and waiter.returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # the claim file goes with its last holder


def test_a_killed_holder_leaves_no_claim_behind(tmp_path):
    out = tmp_path / "out.txt"
    holder = hold(out)
    holder.kill()
    holder.wait(timeout=60)
    waiter = python(WAITER, out)
    assert waiter.communicate(timeout=120)[0].strip() == "missing"  # no wait, no message
    with claim(out):  # and in this process too, which now names itself in the claim file
        assert (tmp_path / ".out.txt.claim").read_text().startswith(f"pid {os.getpid()} on ")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_made_for_the_claim_goes_when_nothing_was_made_in_it(tmp_path):
    out = tmp_path / "perturbations" / "noise-t2"
    with pytest.raises(ValueError), claim(out):
        assert (tmp_path / "perturbations" / ".noise-t2.claim").is_file()
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []
    with claim(out):
        out.mkdir()
    assert [p.name for p in (tmp_path / "perturbations").iterdir()] == ["noise-t2"]


STEPS = {  # script: its arguments on the attacked run, and the output they make
    "gen_confusing.py": (["--target", "2", "--pert", "noise", "--poison-num", "5", "--device", "cpu"],
                         "perturbations/noise-t2-m5-e8-seed0"),
    "train_backdoor.py": (["--resume", "--device", "cpu", "--workers", "0"], f"backdoor/{POISONED}"),
}


@pytest.mark.parametrize("script", sorted(STEPS))
def test_a_step_waits_for_another_process_making_the_same_output(script, attacked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(attacked, run)
    argv, made = STEPS[script]
    out = run / made
    with claim(out):
        step = subprocess.Popen([sys.executable, script, "--run", str(run), *argv], cwd=REPO, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        said = next((line for line in step.stdout if "waiting for it to finish" in line), "")
        assert f"{out} is being made by pid {os.getpid()} on " in said
    rest = step.communicate(timeout=300)[0]
    assert step.returncode == 0 and any(out.iterdir()), rest


def test_a_file_system_without_locks_makes_the_output_unclaimed(tmp_path, monkeypatch, capsys):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(io.fcntl, "flock", no_locks)
    with claim(tmp_path / "out"):
        (tmp_path / "out").write_text("made")
    assert "does not support file locks" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
