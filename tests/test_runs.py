"""Run records: atomic writes and provenance."""
import json

import pytest
import torch

from runs import UserError, atomic_save, provenance, read_json, write_json
from runs.errors import UserError as Err


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_json({"a": 1}, tmp_path / "x" / "r.json")
    atomic_save({"t": torch.ones(2)}, tmp_path / "x" / "c.pt")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["c.pt", "r.json"]
    assert read_json(tmp_path / "x" / "r.json") == {"a": 1}


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_previous_file(tmp_path):
    write_json({"old": True}, tmp_path / "r.json")
    with pytest.raises(TypeError):
        write_json({"bad": object()}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_read_json_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_provenance_names_code_libraries_and_device():
    info = provenance("cpu")
    assert {"git_commit", "git_dirty", "torch", "torchvision", "numpy", "device", "device_name"} <= set(info)
    assert info["device"] == "cpu" and "cores" in info["device_name"]


def test_provenance_records_the_cpu_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert provenance()["torch_threads"] == 1
        torch.set_num_threads(2)
        assert provenance()["torch_threads"] == 2
    finally:
        torch.set_num_threads(threads)


def test_user_error_from_a_dataloader_worker_keeps_only_the_message():
    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nruns.errors.UserError: train.txt:4: cannot read image a.png')
    assert str(Err(wrapped)) == "train.txt:4: cannot read image a.png"
