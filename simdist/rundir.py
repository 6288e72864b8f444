"""What `--out` may be: a new path, an empty directory, or a previous simdist output directory: a
run directory (its plan.json records `simdist_version`), a sweep / search directory (its
sweep.json records it) or a fit directory (its fit.json). Anything else — a file, a project's directory (`--out .`)
— is refused before simulating, so a run never deletes what it did not write. The place must
also be writable: checked by creating (and removing) a temporary directory in the nearest
existing ancestor, so a read-only place fails before the simulation, not after it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from simdist.config import ConfigError

MARKER = "simdist_version"  # a key of every plan.json and sweep.json simdist writes
MARKED_FILES = ("plan.json", "sweep.json", "fit.json")  # a run; a sweep or search; a fit


def _marked(path: Path, name: str) -> bool:
    try:
        data = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and MARKER in data


def is_run_dir(path: Path) -> bool:
    """A directory holding a plan.json written by simdist."""
    return _marked(path, "plan.json")


def is_sweep_dir(path: Path) -> bool:
    """A directory holding a sweep.json written by `simdist sweep` or `simdist search`."""
    return _marked(path, "sweep.json")


def is_output_dir(path: Path) -> bool:
    """Anything simdist may replace: a run directory or a sweep / search directory."""
    return any(_marked(path, name) for name in MARKED_FILES)


def check_out(out: str | os.PathLike, key: str = "--out") -> Path:
    """The absolute run directory for `out`; ConfigError(key) if it may not be written there."""
    if "\0" in str(out) or not str(out).strip():
        raise ConfigError(key, f"{str(out)!r} is not a path")
    try:
        path = Path(out).expanduser().resolve()  # as ClusterPlan.write resolves it
    except (OSError, RuntimeError) as e:
        raise ConfigError(key, f"{out}: {e}") from None
    allowed = ("allowed: a new path, an empty directory or a previous simdist run (or sweep) "
               "directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} exists and is not a directory; {allowed}")
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
        if not empty and not is_output_dir(path):
            raise ConfigError(key, f"{path} is a directory that is not a simdist run (no plan.json, "
                                   f"sweep.json or fit.json with {MARKER}); it is left as it is; "
                                   f"{allowed}")
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


def staging_dir(out: Path) -> Path:
    """A new directory beside `out` to build it in (then `install` it), with the permissions
    of an ordinary mkdir (mkdtemp makes it private)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def install(tmp: Path, out: Path) -> Path:
    """Put the built directory `tmp` at `out`, replacing what `check_out(out)` allowed there:
    the previous directory is moved aside first and put back if the swap fails."""
    import shutil

    check_out(out)  # again: the place may have changed while the sweep ran
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
