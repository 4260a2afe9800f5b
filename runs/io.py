"""Atomic output: every file is written under a temporary name in its folder, then renamed into place; an output
being made is claimed, so that two processes asking for it make it once."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

import torch

from runs.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs are not claimed there
    fcntl = None


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


@contextmanager
def claim(out: str | os.PathLike) -> Iterator[None]:
    """Hold the output `out` (a file or folder) while this process makes it or decides to reuse it.

    Another process asking for the same output (two table commands sharing a step, the jobs of an array) waits here,
    saying for whom, and goes on when the holder is done, so it finds the output finished and reuses it instead of
    writing the same files at the same time. An advisory lock (fcntl.flock) on the hidden file `.NAME.claim` beside
    `out`, which names the holder while it holds: the kernel releases the lock when the holder ends in any way, so a
    killed process leaves no stale claim, and the file is removed on release (a folder the claim had to create is
    removed too when nothing was made in it), so a step that stops on bad input leaves nothing behind. Nothing is
    held where flock does not exist (Windows) or the file system refuses locks (then with a note saying so).
    """
    if fcntl is None:
        yield
        return
    out = Path(out)
    path, made_folder = out.parent / f".{out.name}.claim", not out.parent.exists()
    while True:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(path, "a+", encoding="utf-8")
        except FileNotFoundError:  # the folder was removed meanwhile by a holder that had made it
            continue
        if not _lock(handle, out):  # a file system without locks (some network mounts): make it unclaimed
            handle.close()
            path.unlink(missing_ok=True)
            yield
            return
        with suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        handle.close()  # the holder removed this claim file as it finished: claim the path anew
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiter then sees its file gone and claims anew
        handle.close()
        if made_folder:
            with suppress(OSError):  # not empty: something was made there
                out.parent.rmdir()


def _lock(handle, out: Path) -> bool:
    """Lock the open claim file of `out`, waiting for its holder if there is one; False where the file system has
    no locks."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not said who it is"
        print(f"{out} is being made by {holder}; waiting for it to finish", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:
        print(f"note: {out.parent} does not support file locks ({error.strerror}); {out.name} is made unclaimed, "
              f"so do not run two commands that make it at the same time", flush=True)
        return False
    return True


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
