"""The layer level of the shared cache: layer-memo models (mode/layer_memo.StreamModel) kept
on disk as Arrow IPC (the model's named parts, StreamModel.to_parts, as JSON), so a rank class
simulated once is rebuilt for any depth by any later run, without executing anything. Only the
coordinator reads and writes it (on the driver's node, like the dispatch cache's service), so
on a multi-node cluster the models land in the user's cache dir, not on the workers' disks.

Layout::

    <cache_dir>/layers/memo<N>-torch-<torch version>/<blake2b-128 of the key>.arrow
    <cache_dir>/layers/memo<N>-torch-<torch version>/<blake2b-128 of the key>.rebuilt.arrow

One file per key. Two kinds: a memo model (`get` / `put`), and a rebuilt rank (`get_tables`
/ `put_tables`: the trace a model gives for one depth, as its Arrow tables and scalar fields,
so a warm run reads tables instead of rebuilding the events; its key is the model's key and
the depth). The key is the text of everything a memo model depends on: the execution
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
REBUILT_FORMAT = 1
_SCHEMA = pa.schema([("part", pa.string()), ("json", pa.large_string())])
_TABLES_SCHEMA = pa.schema([("part", pa.string()), ("ipc", pa.large_binary())])
_META_KEY = b"simdist.layers.key"
_META_FIELDS = b"simdist.layers.fields"
_REBUILT = ".rebuilt.arrow"
_reported: set[str] = set()


EXECUTION_SOURCES = ("mode", "models", "parallel")  # the code that executes ranks


@cache
def source_digest(subpackages: tuple[str, ...] = EXECUTION_SOURCES) -> str:
    """blake2b of simdist's source files under `subpackages` (default: the execution code;
    ("."): every file of the package)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=16)
    for sub in subpackages:
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

    def rebuilt_key(self, key: str, depth: str) -> str:
        """The key of the rank a model (`key`) gives for `depth` (the memo shape's text)."""
        return f"{key} rebuilt{REBUILT_FORMAT} {depth}"

    def _path(self, key: str, suffix: str = ".arrow") -> Path:
        return self.dir / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}{suffix}"

    def get(self, key: str) -> dict[str, Any] | None:
        table = self._read(self._path(key), key)
        return decode(table) if table is not None else None

    def put(self, key: str, parts: dict[str, Any]) -> None:
        """Best effort: a cache that cannot be written costs speed, never the run."""
        self._write(self._path(key), encode(parts), key)

    def get_tables(self, key: str) -> tuple[dict[str, pa.Table], dict[str, Any]] | None:
        """A rebuilt rank: its named tables (memory-mapped, zero-copy) and its fields."""
        path = self._path(key, _REBUILT)
        table = self._read(path, key)
        if table is None:
            return None
        try:
            tables = {p: pa.ipc.open_stream(b.as_buffer()).read_all()
                      for p, b in zip(table["part"].to_pylist(), table["ipc"])}
            fields = json.loads(table.schema.metadata[_META_FIELDS])
        except Exception as e:  # noqa: BLE001 - as _read: a reported miss
            self._quarantine(path, f"{type(e).__name__}: {e}")
            return None
        return tables, fields

    def put_tables(self, key: str, tables: dict[str, pa.Table], fields: dict[str, Any]) -> None:
        """Keep a rebuilt rank (best effort, as `put`)."""
        try:
            blobs = []
            for t in tables.values():
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, t.schema) as w:
                    w.write_table(t)
                blobs.append(sink.getvalue().to_pybytes())
            table = pa.table({"part": list(tables), "ipc": blobs}, schema=_TABLES_SCHEMA)
            table = table.replace_schema_metadata({_META_FIELDS: json.dumps(fields).encode()})
        except (pa.ArrowException, TypeError, ValueError) as e:
            warn_once(str(self.dir), f"simdist cache: rebuilt rank not stored: {e}")
            return
        self._write(self._path(key, _REBUILT), table, key)

    def _read(self, path: Path, key: str) -> pa.Table | None:
        try:
            with pa.memory_map(str(path)) as f:
                table = pa.ipc.open_file(f).read_all()
            table.validate(full=True)
            meta = table.schema.metadata or {}
            if meta.get(_META_KEY, b"").decode() != key:
                raise ValueError("the file holds another key")
            table = table.replace_schema_metadata({k: v for k, v in meta.items()
                                                   if k != _META_KEY})
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a reported miss
            self._quarantine(path, f"{type(e).__name__}: {e}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU
        return table

    def _write(self, path: Path, table: pa.Table, key: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = dict(table.schema.metadata or {})
            table = table.replace_schema_metadata({**meta, _META_KEY: key.encode()})
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(
                    f, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
                w.write_table(table)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._evict()
        except OSError as e:
            warn_once(str(self.dir), f"simdist cache: layer memo not stored in {self.dir}: {e}")

    def files(self, rebuilt: bool = False) -> list[Path]:
        """The models' files (`rebuilt`: also the rebuilt ranks')."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.arrow")
                      if rebuilt or not p.name.endswith(_REBUILT))

    def usage(self) -> tuple[int, int]:
        """(models stored, bytes on disk: models and rebuilt ranks)."""
        return len(self.files()), sum(_size(p) for p in self.files(rebuilt=True))

    def _evict(self) -> None:
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.files(rebuilt=True)]
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size

    def _quarantine(self, path: Path, problem: str) -> None:
        warn_once(str(path), f"simdist cache: ignoring {path}: {problem}")
        with contextlib.suppress(OSError):
            q = self.root / "quarantine"
            q.mkdir(parents=True, exist_ok=True)
            os.replace(path, q / path.name)


def warn_once(key: str, msg: str) -> None:
    """A CacheWarning, once per `key` per process."""
    if key not in _reported:
        _reported.add(key)
        warnings.warn(msg, CacheWarning, stacklevel=3)
