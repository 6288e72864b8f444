"""The on-disk store of the shared cache: Arrow IPC files under a cache dir. Pure pyarrow.

Layout::

    <cache_dir>/dispatch/torch-<torch version>-schema<N>/
        entries-<time ns>-<pid>-<rand>-<blake2b>.arrow   dispatch-cache entries (schema.py)
        costs-<time ns>-<pid>-<rand>-<blake2b>.arrow     op cost rows
        .lock                                            compaction lock (flock)
    <cache_dir>/quarantine/                              corrupt / foreign files, moved aside

Concurrency: one file per writer, plus compaction.
* A run never rewrites a file: at write-back it adds its own delta files (new entries, plus the
  stored entries it used, with a new `last_used`), each written to a temp name, fsynced and
  `os.replace`d into place, so readers only ever see complete files and two concurrent runs
  cannot lose each other's entries.
* Then, if it can take the directory's compaction lock without waiting (`flock`), it merges
  every file present into one (dedup by key: newest `last_used` wins), applies the size bound by
  evicting least-recently-used entries, writes the result the same atomic way and only then
  deletes the files it merged. Files that appear meanwhile are not touched; a run that cannot
  get the lock leaves compaction to the next run.
* A reader that finds a listed file gone (compacted away under it) lists again: the compacted
  file holds the same rows; duplicates across files are harmless (dedup on load).

Integrity: the file name carries the blake2b-128 of the file's bytes. A file whose bytes do not
match (truncated, corrupted), that Arrow cannot read, whose schema differs, or whose schema
metadata names another torch / schema version is reported once (a CacheWarning, not an
exception), moved to quarantine/ (so it is not reported again by the next run) and ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from simdist.cache import schema as S

DEFAULT_DIR = "~/.cache/simdist"
ENV_DIR = "SIMDIST_CACHE_DIR"
ENV_MAX_BYTES = "SIMDIST_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 256 * 2**20
STALE_TMP_S = 3600.0

_NAME = re.compile(r"^(entries|costs)-(\d+)-(\d+)-([0-9a-f]+)-([0-9a-f]{32})\.arrow$")


class CacheWarning(UserWarning):
    """A cache file was unreadable, corrupt or from another version and was ignored."""


_reported: set[str] = set()


def resolve_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else $SIMDIST_CACHE_DIR, else ~/.cache/simdist. The
    environment variable also replaces the default value of `simulation.cache_dir` (so a test
    or CI job can isolate itself), never a value a config sets explicitly."""
    env = os.environ.get(ENV_DIR)
    raw = env if env and (not cache_dir or str(cache_dir) == DEFAULT_DIR) else (cache_dir or DEFAULT_DIR)
    return Path(os.path.expandvars(str(raw))).expanduser()


def max_bytes_default() -> int:
    raw = os.environ.get(ENV_MAX_BYTES)
    try:
        return int(raw) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


def version_tag(torch_version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", torch_version)
    return f"torch-{safe}-schema{S.SCHEMA_VERSION}"


@dataclass
class Snapshot:
    """What the cache service hands to workers (through the object store: zero-copy)."""

    entries: pa.Table
    cost_hardware: str | None = None
    cost_keys: list[str] = field(default_factory=list)  # key_ids with cost rows for it


@dataclass
class Loaded:
    entries: pa.Table
    costs: pa.Table
    files: list[Path]  # files read successfully
    bytes: int
    problems: list[str]
    ms: float


@dataclass
class WriteResult:
    written: list[Path]
    compacted: bool
    entries: int | None  # rows in the store after compaction (None: not compacted)
    cost_rows: int | None
    evicted: int
    bytes: int  # bytes of the store's files after the write
    files: int
    problems: list[str]
    ms: float


def serialize(table: pa.Table, compression: str | None = "zstd") -> pa.Buffer:
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(
        compression=compression if compression and pa.Codec.is_available(compression) else None)
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return sink.getvalue()


def _digest(buf: pa.Buffer | bytes) -> str:
    return hashlib.blake2b(memoryview(buf), digest_size=16).hexdigest()


def dedupe(table: pa.Table, keys: list[str], newest: str) -> pa.Table:
    """One row per `keys`, the one with the largest `newest`."""
    if table.num_rows <= 1:
        return table
    order = [(k, "ascending") for k in keys] + [(newest, "descending")]
    t = table.take(pc.sort_indices(table, sort_keys=order))
    first = None
    for k in keys:
        col = t[k].combine_chunks()
        diff = pc.not_equal(col.slice(1), col.slice(0, len(col) - 1))
        diff = pc.fill_null(diff, True)
        first = diff if first is None else pc.or_(first, diff)
    mask = pa.concat_arrays([pa.array([True]), first])
    return t.filter(mask)


class CacheStore:
    def __init__(self, cache_dir: str | os.PathLike | None, torch_version: str,
                 max_bytes: int | None = None) -> None:
        self.root = resolve_dir(cache_dir)
        self.torch_version = torch_version
        self.dir = self.root / "dispatch" / version_tag(torch_version)
        self.quarantine = self.root / "quarantine"
        self.max_bytes = max_bytes if max_bytes is not None else max_bytes_default()

    # -- files --------------------------------------------------------------------------------

    def list_files(self, kind: str | None = None) -> list[Path]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m and (kind is None or m.group(1) == kind):
                out.append(p)
        return sorted(out, key=lambda p: p.name)

    def _report(self, path: Path, problem: str, problems: list[str]) -> None:
        msg = f"simdist cache: ignoring {path}: {problem}"
        problems.append(msg)
        if str(path) not in _reported:
            _reported.add(str(path))
            warnings.warn(msg, CacheWarning, stacklevel=3)
        with contextlib.suppress(OSError):
            self.quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.quarantine / path.name)

    def _read(self, path: Path, problems: list[str]) -> tuple[pa.Table | None, bool]:
        """(table, vanished). Problems are reported and the file quarantined."""
        m = _NAME.match(path.name)
        kind = m.group(1) if m else "?"
        try:
            with pa.memory_map(str(path)) as f:
                buf = f.read_buffer()
        except FileNotFoundError:
            return None, True
        except OSError as e:
            self._report(path, f"unreadable ({e})", problems)
            return None, False
        if m is None or _digest(buf) != m.group(5):
            self._report(path, "checksum mismatch (truncated or corrupt)", problems)
            return None, False
        try:
            table = pa.ipc.open_file(buf).read_all()
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            self._report(path, f"not a readable Arrow file ({type(e).__name__}: {e})", problems)
            return None, False
        tkind, sver, tver = S.table_versions(table.schema)
        if tkind != kind or sver != str(S.SCHEMA_VERSION) or tver != self.torch_version:
            self._report(path, f"foreign version (kind {tkind}, schema {sver}, torch {tver}; "
                               f"this is schema {S.SCHEMA_VERSION}, torch {self.torch_version})",
                         problems)
            return None, False
        expected = S.entries_schema(tver) if kind == "entries" else S.costs_schema(tver)
        if not table.schema.equals(expected, check_metadata=False):
            self._report(path, "unexpected schema", problems)
            return None, False
        return table, False

    def load(self) -> Loaded:
        t0 = time.perf_counter()
        tables: dict[str, list[pa.Table]] = {"entries": [], "costs": []}
        files: list[Path] = []
        problems: list[str] = []
        seen: set[str] = set()
        nbytes = 0
        for _ in range(4):  # relist when a file was compacted away under us
            vanished = False
            for p in self.list_files():
                if p.name in seen:
                    continue
                seen.add(p.name)
                t, gone = self._read(p, problems)
                if gone:
                    vanished = True
                elif t is not None:
                    kind = _NAME.match(p.name).group(1)
                    tables[kind].append(t)
                    files.append(p)
                    with contextlib.suppress(OSError):
                        nbytes += p.stat().st_size
            if not vanished:
                break
        entries = self._concat(tables["entries"], S.entries_schema(self.torch_version))
        costs = self._concat(tables["costs"], S.costs_schema(self.torch_version))
        entries = dedupe(entries, ["key_id"], "last_used")
        costs = dedupe(costs, ["key_id", "hardware"], "updated")
        return Loaded(entries, costs, files, nbytes, problems, (time.perf_counter() - t0) * 1e3)

    @staticmethod
    def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
        if not tables:
            return schema.empty_table()
        return pa.concat_tables([t.replace_schema_metadata(schema.metadata) for t in tables])

    def _write_file(self, kind: str, table: pa.Table, buf: pa.Buffer | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = buf if buf is not None else serialize(table)
        name = (f"{kind}-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}-"
                f"{_digest(buf)}.arrow")
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(buf))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def write(self, entries: pa.Table | None, costs: pa.Table | None) -> list[Path]:
        """Add delta files (atomic); never touches existing files."""
        out = []
        if entries is not None and entries.num_rows:
            out.append(self._write_file("entries", entries.cast(S.entries_schema(self.torch_version))))
        if costs is not None and costs.num_rows:
            out.append(self._write_file("costs", costs.cast(S.costs_schema(self.torch_version))))
        return out

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        try:
            import fcntl
        except ImportError:  # no flock: never compact concurrently, so never compact
            yield False
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _fit(self, entries: pa.Table, costs: pa.Table) -> tuple[pa.Table, pa.Table, pa.Buffer, pa.Buffer, int]:
        """Evict least-recently-used entries (and their unmeasured cost rows) until the two
        files fit in max_bytes."""
        evicted = 0
        entries = entries.take(pc.sort_indices(entries, sort_keys=[("last_used", "descending"),
                                                                   ("key_id", "ascending")]))
        eb, cb = serialize(entries), serialize(costs)
        while eb.size + cb.size > self.max_bytes and entries.num_rows:
            per_row = (eb.size + cb.size) / entries.num_rows
            keep = min(entries.num_rows - 1, int(self.max_bytes / per_row * 0.95))
            keep = max(keep, 0)
            evicted += entries.num_rows - keep
            entries = entries.slice(0, keep)
            alive = pc.is_in(costs["key_id"], value_set=entries["key_id"].combine_chunks())
            costs = costs.filter(pc.or_(alive, pc.is_valid(costs["measured_time_s"])))
            eb, cb = serialize(entries), serialize(costs)
        return entries, costs, eb, cb, evicted

    def compact(self, force: bool = False) -> tuple[bool, int, int, int, list[str]]:
        """Merge all files into one per kind, apply the size bound. Returns (compacted,
        entries, cost rows, evicted, problems); (False, ...) when another process holds the
        lock or there is nothing to merge."""
        with self._lock() as got:
            if not got:
                return False, 0, 0, 0, []
            self._clean_tmp()
            files = self.list_files()
            n_entries_files = sum(1 for p in files if p.name.startswith("entries-"))
            n_cost_files = len(files) - n_entries_files
            total = sum(_size(p) for p in files)
            if not force and n_entries_files <= 1 and n_cost_files <= 1 and total <= self.max_bytes:
                return False, 0, 0, 0, []
            loaded = self.load()
            entries, costs, eb, cb, evicted = self._fit(loaded.entries, loaded.costs)
            keep = []
            if entries.num_rows:
                keep.append(self._write_file("entries", entries, eb))
            if costs.num_rows:
                keep.append(self._write_file("costs", costs, cb))
            for p in loaded.files:
                if p not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            return True, entries.num_rows, costs.num_rows, evicted, loaded.problems

    def _clean_tmp(self) -> None:
        now = time.time()
        for p in self.dir.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink()

    def write_back(self, entries: pa.Table | None, costs: pa.Table | None) -> WriteResult:
        t0 = time.perf_counter()
        written = self.write(entries, costs)
        compacted, n_entries, n_costs, evicted, problems = self.compact()
        files = self.list_files()
        return WriteResult(
            written=written, compacted=compacted,
            entries=n_entries if compacted else None, cost_rows=n_costs if compacted else None,
            evicted=evicted, bytes=sum(_size(p) for p in files), files=len(files),
            problems=problems, ms=(time.perf_counter() - t0) * 1e3)

    # -- maintenance (simdist cache info | clear) ---------------------------------------------

    def clear(self) -> int:
        """Remove the dispatch store (every version) and the quarantine; returns files removed."""
        n = 0
        for sub in (self.root / "dispatch", self.quarantine):
            if sub.is_dir():
                n += sum(1 for p in sub.rglob("*") if p.is_file())
                shutil.rmtree(sub, ignore_errors=True)
        return n


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0
