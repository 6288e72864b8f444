"""What `--out` may be: a new path, an empty directory, or a previous simdist run directory (its
plan.json records `simdist_version`). Anything else — a file, a project's directory (`--out .`)
— is refused before simulating, so a run never deletes what it did not write. The place must
also be writable: checked by creating (and removing) a temporary directory in the nearest
existing ancestor, so a read-only place fails before the simulation, not after it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from simdist.config import ConfigError

MARKER = "simdist_version"  # a key of every plan.json simdist writes


def is_run_dir(path: Path) -> bool:
    """A directory holding a plan.json written by simdist."""
    try:
        data = json.loads((path / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and MARKER in data


def check_out(out: str | os.PathLike, key: str = "--out") -> Path:
    """The absolute run directory for `out`; ConfigError(key) if it may not be written there."""
    if "\0" in str(out) or not str(out).strip():
        raise ConfigError(key, f"{str(out)!r} is not a path")
    try:
        path = Path(out).expanduser().resolve()  # as ClusterPlan.write resolves it
    except (OSError, RuntimeError) as e:
        raise ConfigError(key, f"{out}: {e}") from None
    allowed = "allowed: a new path, an empty directory or a previous simdist run directory"
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} exists and is not a directory; {allowed}")
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
        if not empty and not is_run_dir(path):
            raise ConfigError(key, f"{path} is a directory that is not a simdist run (no plan.json "
                                   f"with {MARKER}); it is left as it is; {allowed}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(key, f"cannot create {path}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".simdist-probe.", dir=parent))
    except OSError as e:
        raise ConfigError(key, f"cannot write {path}: {parent} is not writable "
                               f"({e.strerror or e})") from None
    return path
