"""Spreading a table's (run, target) jobs: the commands for a job array, and the scheduler over GPUs."""
import shutil

import pytest
import torch

import table1
import table3
from runs import UserError
from runs.tables import parse_gpus, spread, without_options


def test_without_options_drops_flags_and_their_values():
    parser = table1.build_parser()
    argv = ["--runs", "a", "b", "--targets", "2", "3", "--poison-num", "60", "--gpus=0,1", "--print-commands",
            "--out", "x", "--methods", "None", "CIBA"]
    assert without_options(parser, argv, {"runs", "targets", "gpus", "print_commands", "out"}) == [
        "--poison-num", "60", "--methods", "None", "CIBA"]


@pytest.mark.parametrize("text", ["a,b", "1,1", "-1", ","])
def test_bad_gpu_lists(text):
    with pytest.raises(UserError, match="--gpus"):
        parse_gpus(text)


def test_table1_prints_one_command_per_target_and_the_assembling_one(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "clean", run / "clean")
    out = table1.main(["--runs", str(run), "--num-targets", "2", "--poison-num", "5", "--trigger-steps", "3",
                       "--print-commands"])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("python ")]
    assert len(out["jobs"]) == 2 and len(lines) == 3
    for (name, argv), line in zip(out["jobs"], lines):
        target = argv[argv.index("--targets") + 1]
        assert name.endswith(f"t{target}") and "--print-commands" not in argv and "--num-targets" not in argv
        assert line.startswith("python table1.py --poison-num 5 --trigger-steps 3 --runs")
        assert f"parts/48bits-t{target}" in line
    assert lines[-1] == f"python table1.py --runs {run} --num-targets 2 --poison-num 5 --trigger-steps 3"
    assert sorted(p.name for p in run.iterdir()) == ["clean"]  # nothing ran


def test_table3_trains_badhash_generator_before_the_jobs(tiny_run, capsys):
    table3.main(["--run", str(tiny_run), "--targets", "1", "4", "--gen-epochs", "1", "--print-commands"])
    printed = capsys.readouterr().out.splitlines()
    first = printed.index("# 1. once, before the jobs (they share its output):")
    assert printed[first + 1].startswith(f"python gen_trigger.py --run {tiny_run} --target 1 --method badhash")
    assert sum(line.startswith("python table3.py") for line in printed) == 3


def test_gpus_this_machine_does_not_have(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "clean", run / "clean")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--gpus 0,1: CUDA is not available on this machine"):
        table1.main(["--runs", str(run), "--num-targets", "1", "--gpus", "0,1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="--gpus 1,2: this machine has 2 CUDA device\\(s\\); name GPUs 0 to 1"):
        table1.main(["--runs", str(run), "--num-targets", "1", "--gpus", "1,2"])
    assert sorted(p.name for p in run.iterdir()) == ["clean"]


def test_jobs_run_in_parallel_over_the_gpus_and_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fake jobs below need no GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    script = tmp_path / "job.py"
    script.write_text("import sys, pathlib\n"
                      "name, device = sys.argv[1], sys.argv[-1]\n"
                      "pathlib.Path(sys.argv[2]).joinpath(name).write_text(device)\n"
                      "sys.exit(3 if name == 'bad' else 0)\n")
    jobs = [(name, [name, str(tmp_path)]) for name in ("a", "b", "c")]
    spread(str(script), [], jobs, [], [0, 1], False, tmp_path / "logs")
    assert {(tmp_path / n).read_text() for n in "abc"} <= {"cuda:0", "cuda:1"}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["a.log", "b.log", "c.log"]
    with pytest.raises(UserError, match="job\\(s\\) bad failed; see their logs"):
        spread(str(script), [], [("bad", ["bad", str(tmp_path)])], [], [0], False, tmp_path / "logs")
    first = tmp_path / "first.py"
    first.write_text("import sys; sys.exit(1)\n")
    with pytest.raises(UserError, match="failed; fix it before the jobs can run"):
        spread(str(script), [[str(first)]], jobs, [], [0], False, tmp_path / "logs")
