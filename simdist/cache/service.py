"""`CacheService`: the Ray actor that shares the store with the workers of one run.

It loads the store once, serves a snapshot (one `ray.put` of the Arrow table: workers on the
node map it zero-copy from the object store), collects the workers' new entries, cost rows and
the stored entries they used, and at the end of the run writes them back (store.write_back:
one delta file per run, then compaction under a lock). Pure pyarrow: no torch in this actor.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from simdist.cache import schema as S
from simdist.cache.store import CacheStore, CacheWarning, Snapshot, dedupe


class CacheService:
    def __init__(self, cache_dir: str | None, torch_version: str,
                 max_bytes: int | None = None) -> None:
        self.store = CacheStore(cache_dir, torch_version, max_bytes)
        self.torch_version = torch_version
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)  # returned to the coordinator instead
            self.loaded = self.store.load()
        self.problems = list(self.loaded.problems)
        self._snapshots: dict[str | None, list] = {}
        self._entries: list[pa.Table] = []
        self._costs: list[pa.Table] = []
        self._used: Counter = Counter()

    def info(self) -> dict[str, Any]:
        return dict(dir=str(self.store.root), files=len(self.loaded.files),
                    entries=self.loaded.entries.num_rows, cost_rows=self.loaded.costs.num_rows,
                    bytes=self.loaded.bytes, load_ms=self.loaded.ms, problems=self.problems)

    def snapshot(self, hardware: str | None = None) -> list:
        """[ObjectRef of a Snapshot, its id]. The ref is wrapped in a list so the caller gets
        the ref (and passes it on) instead of the value."""
        if hardware not in self._snapshots:
            import ray

            costs = self.loaded.costs
            keys = (costs.filter(pc.equal(costs["hardware"], hardware))["key_id"].to_pylist()
                    if hardware is not None else [])
            ref = ray.put(Snapshot(self.loaded.entries, hardware, keys))
            self._snapshots[hardware] = [ref, f"{uuid.uuid4().hex}-{hardware}"]
        return self._snapshots[hardware]

    def merge(self, entries: pa.Table | None, costs: pa.Table | None, used: list[str]) -> int:
        if entries is not None and entries.num_rows:
            self._entries.append(entries)
        if costs is not None and costs.num_rows:
            self._costs.append(costs)
        self._used.update(used)
        return sum(t.num_rows for t in self._entries)

    def flush(self) -> dict[str, Any]:
        """Write this run's delta back; returns the store's figures for plan.json."""
        now = time.time()
        e_schema = S.entries_schema(self.torch_version)
        new = (pa.concat_tables(self._entries).cast(e_schema) if self._entries
               else e_schema.empty_table())
        new = dedupe(new, ["key_id"], "last_used")  # two workers may add the same entry
        old = self.loaded.entries
        if new.num_rows and old.num_rows:
            new = new.filter(pc.invert(pc.is_in(new["key_id"], value_set=old["key_id"].combine_chunks())))
        touched = 0
        delta = new
        if old.num_rows and self._used:
            ids = pa.array(sorted(self._used), pa.string())
            t = old.filter(pc.is_in(old["key_id"], value_set=ids))
            counts = pa.array([self._used[k] for k in t["key_id"].to_pylist()], pa.int64())
            t = t.set_column(t.schema.get_field_index("last_used"), "last_used",
                             pa.array([now] * t.num_rows, pa.float64()))
            t = t.set_column(t.schema.get_field_index("uses"), "uses",
                             pc.add(pc.fill_null(t["uses"], 0), counts))
            touched = t.num_rows
            delta = pa.concat_tables([new, t])
        c_schema = S.costs_schema(self.torch_version)
        costs = pa.concat_tables(self._costs).cast(c_schema) if self._costs else None
        if costs is not None:
            costs = dedupe(costs, ["key_id", "hardware"], "updated")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            res = self.store.write_back(delta, costs)
        self.problems += res.problems
        entries_after = res.entries if res.entries is not None else old.num_rows + new.num_rows
        self._entries, self._costs, self._used = [], [], Counter()
        return dict(new_entries=new.num_rows, touched=touched,
                    new_cost_rows=0 if costs is None else costs.num_rows,
                    entries=entries_after, cost_rows=res.cost_rows, evicted=res.evicted,
                    bytes=res.bytes, files=res.files, compacted=res.compacted,
                    dump_ms=res.ms, problems=self.problems)
