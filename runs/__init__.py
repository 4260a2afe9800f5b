"""Run directories: user-facing errors, atomic file output, settings and provenance records."""
from runs.device import add_deterministic_flag, deterministic_argv, make_deterministic, pick_device
from runs.errors import UserError, cli_entry, require_at_least_one
from runs.io import (atomic_path, atomic_save, atomic_write_text, claim, load_saved, pick_output, read_json,
                     read_timing, write_json, write_timing)
from runs.provenance import fingerprint, provenance, weights_id

__all__ = ["UserError", "cli_entry", "require_at_least_one", "pick_device", "add_deterministic_flag",
           "deterministic_argv", "make_deterministic", "atomic_path", "atomic_save", "atomic_write_text", "claim",
           "load_saved", "pick_output", "read_json", "read_timing", "write_json", "write_timing", "fingerprint",
           "provenance", "weights_id"]
