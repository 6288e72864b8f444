"""The layer level of the shared cache: layer-memo models (mode/layer_memo.StreamModel) kept
on disk as Arrow IPC (the model's named parts, StreamModel.to_parts, as JSON), so a rank class
simulated once is rebuilt for any depth by any later run, without executing anything. Only the
coordinator reads and writes it (on the driver's node, like the dispatch cache's service), so
on a multi-node cluster the models land in the user's cache dir, not on the workers' disks.

Layout::

    <cache_dir>/layers/memo<N>-torch-<torch version>/<blake2b-128 of the key>.arrow

One file per key. The key is the text of everything a memo model depends on: the execution
signature of the rank's short task (simdist/execution_key.py: the fields execution reads, the
rank by its mesh position, so plans that differ only in what does not change the recorded
events share the model), the memo format, the torch version and a digest of the simdist source
that executes ranks (so a changed simdist never reuses an old model). The file holds the key itself (schema metadata,
compared on read: a hash collision or a foreign file is a miss) and the model as one row per
part: the a-block event streams, the edits one more block makes, the scalars.

Writes are atomic (temp file + fsync + rename; two runs writing one key write the same bytes).
A file that cannot be read, fails Arrow validation or holds another key is reported once
(CacheWarning), moved to quarantine/ and treated as a miss: a wrong answer is never read back.
Size bound: after a write, least-recently-used files (by mtime, touched on every hit) are
removed until the directory fits `max_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from simdist.cache.store import CacheWarning, _size, max_bytes_default, resolve_dir

MEMO_FORMAT = 2
_SCHEMA = pa.schema([("part", pa.string()), ("json", pa.large_string())])
_META_KEY = b"simdist.layers.key"
_reported: set[str] = set()


@cache
def source_digest() -> str:
    """blake2b of simdist's execution code (mode/, models/, parallel/)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=16)
    for sub in ("mode", "models", "parallel"):
        for p in sorted((root / sub).rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --- encoding: a memo model is a few named JSON parts (StreamModel.to_parts) ----------------------

def encode(parts: dict[str, Any]) -> pa.Table:
    return pa.table({"part": list(parts), "json": [json.dumps(v, separators=(",", ":"))
                                                   for v in parts.values()]}, schema=_SCHEMA)


def decode(table: pa.Table) -> dict[str, Any]:
    return {p: json.loads(j) for p, j in zip(table["part"].to_pylist(), table["json"].to_pylist())}


# --- the store -----------------------------------------------------------------------------------

@dataclass
class LayerStore:
    root: Path
    torch_version: str
    max_bytes: int

    @classmethod
    def open(cls, cache_dir: str | os.PathLike | None, torch_version: str,
             max_bytes: int | None = None) -> LayerStore:
        return cls(resolve_dir(cache_dir), torch_version,
                   max_bytes if max_bytes is not None else max_bytes_default())

    @property
    def dir(self) -> Path:
        return self.root / "layers" / f"memo{MEMO_FORMAT}-torch-{self.torch_version}"

    def key(self, signature: str) -> str:
        """The store key of a model recorded for `signature` (execution_key.py)."""
        return f"memo{MEMO_FORMAT} torch {self.torch_version} src {source_digest()} {signature}"

    def _path(self, key: str) -> Path:
        return self.dir / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.arrow"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            with pa.memory_map(str(path)) as f:
                table = pa.ipc.open_file(f).read_all()
            table.validate(full=True)
            if (table.schema.metadata or {}).get(_META_KEY, b"").decode() != key:
                raise ValueError("the file holds another key")
            parts = decode(table.replace_schema_metadata(None))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a reported miss
            self._quarantine(path, f"{type(e).__name__}: {e}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU
        return parts

    def put(self, key: str, parts: dict[str, Any]) -> None:
        """Best effort: a cache that cannot be written costs speed, never the run."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            table = encode(parts).replace_schema_metadata({_META_KEY: key.encode()})
            path = self._path(key)
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(
                    f, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
                w.write_table(table)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._evict()
        except OSError as e:
            _warn_once(str(self.dir), f"simdist cache: layer memo not stored in {self.dir}: {e}")

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.arrow")) if self.dir.is_dir() else []

    def usage(self) -> tuple[int, int]:
        """(models stored, bytes on disk)."""
        files = self.files()
        return len(files), sum(_size(p) for p in files)

    def _evict(self) -> None:
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.files()]
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size

    def _quarantine(self, path: Path, problem: str) -> None:
        _warn_once(str(path), f"simdist cache: ignoring {path}: {problem}")
        with contextlib.suppress(OSError):
            q = self.root / "quarantine"
            q.mkdir(parents=True, exist_ok=True)
            os.replace(path, q / path.name)


def _warn_once(key: str, msg: str) -> None:
    if key not in _reported:
        _reported.add(key)
        warnings.warn(msg, CacheWarning, stacklevel=3)
