"""Atomic output: every file is written under a temporary name in its folder, then renamed into place."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from runs.errors import UserError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside `path`; on success it is flushed to disk and renamed to `path`.

    On any error (or a kill before the rename) `path` keeps its previous content and the temporary file is removed
    (or, after a kill, left as a hidden `.name.*.tmp`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; results should read like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a killed process leaves the old file or the new one.

    torch.save names the archive inside the file after a path it is given (here the random temporary name); given an
    open file it uses a fixed name, so the same object always gives the same bytes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def timing_path(path: str | os.PathLike) -> Path:
    """Where the wall-clock record of an output lives: X.json -> X.timing.json beside it.

    Wall times differ from one run to the next, so they are kept out of the outputs themselves: the same command and
    seed then repeat every other file byte for byte."""
    path = Path(path)
    return path.with_name(f"{path.stem}.timing.json")


def write_timing(path: str | os.PathLike, record: dict) -> None:
    """Write the wall-clock record of output `path` (before the output itself, so a complete output has one)."""
    write_json(record, timing_path(path))


def read_timing(path: str | os.PathLike) -> dict:
    """The wall-clock record of output `path`; {} when it has none. Outputs made before records were kept apart
    carried them inside: a `seconds` key (configs, results) or per-epoch `seconds` (history.json)."""
    path = Path(path)
    if timing_path(path).is_file():
        return read_json(timing_path(path))
    if not path.is_file():
        return {}
    made = read_json(path)
    if isinstance(made, list):
        return {"epoch_seconds": [entry.get("seconds") for entry in made if isinstance(entry, dict)]}
    return {"seconds": made["seconds"]} if isinstance(made, dict) and "seconds" in made else {}


def load_saved(path: str | os.PathLike, made_by: str, device: torch.device | str = "cpu") -> Any:
    """torch.load of an output of an earlier step; a missing, truncated or corrupted file is a UserError naming the
    file and the command (`made_by`) that makes it again."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; make it with {made_by}")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # truncated or corrupted files raise several types
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); it is truncated or corrupted: delete it "
                        f"and make it again with {made_by}") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); delete it and rerun the step that writes it") from None


def pick_output(folder: Path, name: str | None, marker: str, made_by: str, flag: str) -> Path:
    """RUN/<kind>/<name> of an earlier step, or the only complete one there when no name is given.

    An output counts as complete when it holds `marker`, the file its step writes last; the errors name the step
    (`made_by`) that makes it and the flag (`flag`) that chooses among several.
    """
    done = sorted(p.parent.name for p in folder.glob(f"*/{marker}")) if folder.is_dir() else []
    if name is None:
        if len(done) == 1:
            return folder / done[0]
        if not done:
            raise UserError(f"{folder} holds nothing yet; run {made_by} first")
        raise UserError(f"{folder} holds several ({', '.join(done)}); choose one with {flag}")
    if name not in done:
        known = f" (there: {', '.join(done)})" if done else ""
        raise UserError(f"{folder / name} does not exist or is incomplete{known}; run {made_by} first")
    return folder / name
