"""The plan level of the shared cache: a sweep's or search's simulated plan kept as the run
directory it wrote (plan.json and the five Parquet tables, timeline.json), so the same plan in a
later sweep is copied, not rebuilt and merged again. A plan's result is a function of its
resolved config, the calibration table it is priced with and the code that simulates and merges
it; the key is the text of all three (the config as JSON with sorted keys, the calibration
file's bytes digest, a digest of every simdist source file, the torch and transformers
versions), so any change in any of them is a miss. Plans whose model is user code
(`model.entrypoint`) are never kept: their source is not simdist's to digest.

Layout::

    <cache_dir>/plans/plan<N>-torch-<torch version>/<blake2b-128 of the key>/
        key.txt   the key itself (compared on read: a hash collision or a foreign dir is a miss)
        plan.json ranks.parquet ops.parquet collectives.parquet memory.parquet kernels.parquet
        timeline.json

Writes are atomic (a temp directory renamed into place; two sweeps writing one key write the
same files and the first rename wins). An entry that lacks a file or holds another key is
reported once (CacheWarning), removed and treated as a miss. Size bound: after a write,
least-recently-used entries (key.txt's mtime, touched on every hit) are removed until the
directory fits `max_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simdist.cache.layers import source_digest, warn_once
from simdist.cache.store import max_bytes_default, resolve_dir

PLAN_FORMAT = 1
FILES = ("plan.json", "ranks.parquet", "ops.parquet", "collectives.parquet", "memory.parquet",
         "kernels.parquet", "timeline.json")
_KEY_FILE = "key.txt"
WHOLE_PACKAGE = (".",)  # a result depends on planning, execution, cost model and merge


def _file_digest(path: str | os.PathLike) -> str:
    return hashlib.blake2b(Path(path).expanduser().read_bytes(), digest_size=16).hexdigest()


def plan_key(config: dict[str, Any], exhaustive: bool) -> str | None:
    """The key of a plan's result (None: not kept, a user-code model)."""
    if (config.get("model") or {}).get("entrypoint"):
        return None
    import torch

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "-"
    calib = (config.get("cluster") or {}).get("calibration")
    try:
        calib_digest = _file_digest(calib) if calib else "default"
    except OSError:
        return None
    return (f"plan{PLAN_FORMAT} torch {torch.__version__} transformers {tf} "
            f"src {source_digest(WHOLE_PACKAGE)} calibration {calib_digest} "
            f"exhaustive {bool(exhaustive)} "
            f"config {json.dumps(config, sort_keys=True, default=str)}")


@dataclass
class PlanStore:
    root: Path
    torch_version: str
    max_bytes: int

    @classmethod
    def open(cls, cache_dir: str | os.PathLike | None, torch_version: str,
             max_bytes: int | None = None) -> PlanStore:
        return cls(resolve_dir(cache_dir), torch_version,
                   max_bytes if max_bytes is not None else max_bytes_default())

    @property
    def dir(self) -> Path:
        return self.root / "plans" / f"plan{PLAN_FORMAT}-torch-{self.torch_version}"

    def _path(self, key: str) -> Path:
        return self.dir / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def restore(self, key: str, dest: Path) -> dict[str, Any] | None:
        """Copy the kept run directory of `key` to `dest` (which must not exist); its plan.json
        summary, or None on a miss."""
        entry = self._path(key)
        try:
            if (entry / _KEY_FILE).read_text() != key:
                raise ValueError("the entry holds another key")
            missing = [f for f in FILES if not (entry / f).is_file()]
            if missing:
                raise ValueError(f"the entry lacks {', '.join(missing)}")
            summary = json.loads((entry / "plan.json").read_text())
            dest.mkdir(parents=True)
            for f in FILES:
                shutil.copyfile(entry / f, dest / f)
        except FileNotFoundError:
            shutil.rmtree(dest, ignore_errors=True)
            return None
        except (OSError, ValueError) as e:
            shutil.rmtree(dest, ignore_errors=True)
            self._drop(entry, f"{type(e).__name__}: {e}")
            return None
        with contextlib.suppress(OSError):
            os.utime(entry / _KEY_FILE)  # LRU
        return summary

    def put(self, key: str, src: Path) -> None:
        """Keep the run directory `src` under `key` (best effort: a cache that cannot be
        written costs speed, never the run)."""
        entry = self._path(key)
        if entry.is_dir():
            return
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            tmp.mkdir(parents=True)
            for f in FILES:
                shutil.copyfile(src / f, tmp / f)
            (tmp / _KEY_FILE).write_text(key)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another sweep kept it first
            self._evict()
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            warn_once(str(self.dir), f"simdist cache: plan not kept in {self.dir}: {e}")

    def entries(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))

    def usage(self) -> tuple[int, int]:
        """(plans kept, bytes on disk)."""
        entries = self.entries()
        return len(entries), sum(_dir_size(p) for p in entries)

    def _evict(self) -> None:
        sized = []
        for p in self.entries():
            with contextlib.suppress(OSError):
                sized.append(((p / _KEY_FILE).stat().st_mtime, _dir_size(p), p))
        total = sum(s for _, s, _ in sized)
        for _, size, p in sorted(sized):
            if total <= self.max_bytes:
                break
            shutil.rmtree(p, ignore_errors=True)
            total -= size

    def _drop(self, entry: Path, problem: str) -> None:
        warn_once(str(entry), f"simdist cache: ignoring {entry}: {problem}")
        shutil.rmtree(entry, ignore_errors=True)


def _dir_size(p: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for f in p.iterdir():
            with contextlib.suppress(OSError):
                total += f.stat().st_size
    return total
