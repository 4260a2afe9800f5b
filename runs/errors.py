"""One exception type for mistakes a user can fix, and the wrapper that turns it into one line and exit 2."""
from __future__ import annotations

import sys
from typing import Callable

_MARK = "UserError: "


class UserError(Exception):
    """An error caused by input the user controls (a file, a flag, a run directory).

    The message names the file, line or value and says what would fix it. When a DataLoader worker re-raises one,
    torch wraps the message in a traceback; the original message is recovered so the user sees one clean line.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message and _MARK in message:
            message = message[message.rindex(_MARK) + len(_MARK):].strip()
        super().__init__(message)


def require_at_least_one(args: object, *names: str) -> None:
    """Each named integer flag (attribute of parsed args) must be >= 1; the message names the flag and its value."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def cli_entry(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's `main`, printing a UserError as `error: ...` on stderr with exit status 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; rerun with --resume where supported",
              file=sys.stderr)
        sys.exit(130)
