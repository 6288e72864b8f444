"""Worker side of the shared cache: warm FakeTensorMode's process-wide dispatch cache from the
store's snapshot, and after each simulated rank collect what the rank added (new entries, cost
rows, which stored entries it used, bypasses by reason).

One `RankCache` lives as long as its process (a Ray actor simulates many ranks; FakeTensorMode's
cache is a class attribute and stays warm between them). Its `around_rank()` is the hook the
execution of a rank enters (simdist/mode/rank.py: execute_unit).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from torch._subclasses import fake_tensor as ft

from simdist.cache import codec
from simdist.cache.store import Snapshot


class TrackingCache(dict):
    """FakeTensorMode.cache that remembers which keys were looked up and found (LRU by last
    use). `_cached_dispatch_impl` reads the cache with `.get` only; insertion, eviction,
    `len` and `clear` stay the C dict's."""

    __slots__ = ("used",)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.used: set = set()

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        v = dict.get(self, key, default)
        if v is not default:
            self.used.add(key)
        return v


def tracking_cache() -> TrackingCache:
    """Install (once) a TrackingCache as FakeTensorMode.cache, keeping its entries."""
    cache = ft.FakeTensorMode.cache
    if not isinstance(cache, TrackingCache):
        cache = TrackingCache(cache)
        ft.FakeTensorMode.cache = cache
    return cache


@dataclass
class CacheDelta:
    """What one rank gives back to the shared cache (and its counters for plan.json)."""

    entries: pa.Table  # new entries, codec schema
    costs: pa.Table  # new cost rows for this run's hardware
    used: list[str]  # key_ids of stored entries this rank hit
    bypasses: dict[str, int]  # bypasses during this rank, by reason
    skipped: dict[str, int]  # new entries that could not be encoded, by reason
    fetch_failed: int = 0  # 1 if this worker could not get the snapshot (ran cold)
    loaded: int = 0  # entries installed from the snapshot before this rank (0 if already warm)
    load_skipped: dict[str, int] = field(default_factory=dict)
    load_ms: float = 0.0
    encode_ms: float = 0.0
    # CPU seconds of this process from before_rank to after_rank (the rank's simulation with
    # the cache's own work): wall time on a shared machine hides what the cache saves.
    rank_cpu_s: float = 0.0


class RankCache:
    def __init__(self) -> None:
        self.snapshot_id: str | None = None
        self.pending: Snapshot | None = None
        self.hardware = None  # GPUSpec for cost rows; None: no cost rows
        self.ids: dict[ft._DispatchCacheKey, str] = {}  # keys the store has (or was sent)
        self.cost_known: set[str] = set()
        self.last_delta: CacheDelta | None = None
        self._loaded = 0
        self._load_skipped: Counter = Counter()
        self._load_ms = 0.0
        self._bypass0: dict[str, int] = {}
        self._fetch_failed = 0
        self._cpu0 = time.process_time()

    def fetch(self, arg) -> None:  # noqa: ANN001 - simdist.cache.run.CacheArg
        """Get the run's snapshot from the CacheService (once per snapshot per process) and
        offer it; a service that failed means a cold rank, never a failed one."""
        snapshot = None
        if arg.snapshot_id != self.snapshot_id:
            import ray

            try:
                ref, _ = ray.get(arg.snapshot[0])
                snapshot = ray.get(ref)
            except Exception:  # noqa: BLE001
                self._fetch_failed = 1
        self.offer(snapshot, arg.snapshot_id if snapshot is not None else self.snapshot_id,
                   arg.hardware)

    # -- warm ---------------------------------------------------------------------------------

    def offer(self, snapshot: Snapshot | None, snapshot_id: str | None, hardware=None) -> None:  # noqa: ANN001
        """Hand over the store's snapshot; it is installed at the next `before_rank` unless this
        process already installed the same one."""
        self.hardware = hardware
        if snapshot is not None and snapshot_id != self.snapshot_id:
            self.pending, self.snapshot_id = snapshot, snapshot_id

    def warm(self, snapshot: Snapshot) -> int:
        t0 = time.perf_counter()
        cache = tracking_cache()
        with codec.gc_paused():
            decoded, skipped = codec.decode_table(snapshot.entries)
        n = 0
        for kid, key, entry in decoded:
            self.ids[key] = kid
            if key not in cache:
                dict.__setitem__(cache, key, entry)
                n += 1
        if self.hardware is not None and snapshot.cost_hardware == self.hardware.name:
            self.cost_known.update(snapshot.cost_keys)
        self._loaded += n
        self._load_skipped.update(skipped)
        self._load_ms += (time.perf_counter() - t0) * 1e3
        return n

    # -- around one rank ----------------------------------------------------------------------

    @contextlib.contextmanager
    def around_rank(self) -> Iterator[None]:
        """Warm FakeTensorMode's cache before the rank; collect its new entries after
        (`last_delta`)."""
        self.before_rank()
        yield
        self.after_rank()

    def before_rank(self) -> None:
        cache = tracking_cache()
        if self.pending is not None:
            snap, self.pending = self.pending, None
            self.warm(snap)
        cache.used.clear()
        self._bypass0 = dict(ft.FakeTensorMode.cache_bypasses)
        self._cpu0 = time.process_time()

    def after_rank(self) -> CacheDelta:
        with codec.gc_paused():
            return self._after_rank()

    def _after_rank(self) -> CacheDelta:
        t0 = time.perf_counter()
        cache = tracking_cache()
        now = time.time()
        new_items = [(k, e) for k, e in list(cache.items()) if k not in self.ids]
        rows, ids, skipped = codec.encode_items(new_items, now)
        # Skipped keys are remembered too (as known, no id) so they are not retried every rank.
        for k, _ in new_items:
            self.ids[k] = ids.get(k, "")
        used_keys = [k for k in cache.used if self.ids.get(k)]
        used = sorted({self.ids[k] for k in used_keys} - set(ids.values()))
        cost_rows = []
        if self.hardware is not None:
            from simdist.cache.costs import cost_row

            for k in [k for k, _ in new_items if k in ids] + used_keys:
                kid = self.ids[k]
                if kid in self.cost_known:
                    continue
                self.cost_known.add(kid)
                entry = dict.get(cache, k)
                row = cost_row(kid, k, entry, self.hardware, now) if entry is not None else None
                if row is not None:
                    cost_rows.append(row)
        from simdist.cache.costs import costs_table

        bypasses = {r: n - self._bypass0.get(r, 0)
                    for r, n in ft.FakeTensorMode.cache_bypasses.items()
                    if n - self._bypass0.get(r, 0) > 0}
        delta = CacheDelta(
            entries=codec.rows_to_table(rows), costs=costs_table(cost_rows), used=used,
            bypasses=bypasses, skipped=dict(skipped), loaded=self._loaded,
            load_skipped=dict(self._load_skipped), load_ms=self._load_ms,
            encode_ms=(time.perf_counter() - t0) * 1e3, fetch_failed=self._fetch_failed,
            rank_cpu_s=time.process_time() - self._cpu0,
        )
        self._loaded, self._load_skipped, self._load_ms = 0, Counter(), 0.0
        self._fetch_failed = 0
        cache.used.clear()
        self.last_delta = delta
        return delta
