"""Coordinator side of the shared cache for one run: start the CacheService actor (on the
driver's node, so the store is the user's cache dir), give workers the snapshot, merge what they
return, write back at the end and fill plan.json `cache`.

Any failure of the cache (unwritable dir, actor death) is a warning and an empty cache, never a
failed simulation.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from simdist.cache.store import CacheWarning


@dataclass(frozen=True)
class CacheArg:
    """Passed to RankWorker.simulate_cached. `snapshot` is `[ref]`, where `ref` is the pending
    result of `CacheService.snapshot` (itself `[ObjectRef[Snapshot]]`): wrapped in a list so
    Ray does not resolve it when the task starts. The driver never waits for the service; a
    worker waits for it only once its own start-up is done, and only if it has not installed
    this snapshot yet."""

    snapshot: list
    snapshot_id: str
    hardware: Any  # GPUSpec: cost rows are computed for it


ENV_PLACEMENT = "SIMDIST_CACHE_SERVICE"
DEFAULT_PLACEMENT = "actor"


class _InDriver:
    """A CacheService object in the driver, called like an actor: `.method.remote(...)` runs
    the method now and returns an awaitable of its result."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.obj, name)

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                fut = asyncio.get_running_loop().create_future()
                try:
                    fut.set_result(fn(*args, **kwargs))
                except Exception as e:  # noqa: BLE001 - delivered to whoever awaits
                    fut.set_exception(e)
                return fut

        return _Method


def unusable_cache_dir(cache_dir: str | None) -> str | None:
    """Why the cache directory cannot be used (a file where the directory should be, or a place
    that cannot be written), or None. Checked once per run, so a bad `cache_dir` is one warning
    and a run without the cache, instead of a warning from every part of the cache."""
    from simdist.cache.store import resolve_dir

    root = resolve_dir(cache_dir)
    place = root
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        what = "is a file" if place == root else f"is under {place}, which is a file"
        return (f"simdist cache: simulation.cache_dir {root} {what}, not a directory; "
                "this run uses no cache")
    if not os.access(place, os.W_OK | os.X_OK):
        return (f"simdist cache: simulation.cache_dir {root} is not writable; this run uses no "
                "cache")
    return None


def layer_summary(traces: list, cache_dir: str | None) -> dict[str, Any]:
    """plan.json `cache.layer`: how each class's blocks were obtained (mode/layer_memo.py).
    hits: memo models read from the layer store (nothing executed); misses: classes executed
    short and fitted (then stored); fallbacks: memo tried, did not fit, executed in full; full:
    memo not applicable or off; shared: middle pipeline ranks rebuilt from another
    (mode/stage_share.py). size / bytes: models in the store after the run."""
    status = Counter(tr.layer_memo for tr in traces)
    out: dict[str, Any] = dict(
        enabled=cache_dir is not None, hits=status["memo-hit"], misses=status["memo"],
        fallbacks=status["fallback"], full=status["full"], shared=status["shared"],
        blocks_executed=sum(tr.blocks_executed for tr in traces),
        blocks_total=sum(tr.blocks_total for tr in traces), size=0, bytes=0)
    if cache_dir is not None:
        import torch

        from simdist.cache.layers import LayerStore

        out["size"], out["bytes"] = LayerStore.open(cache_dir, torch.__version__).usage()
    return out


def pipeline_summary(traces: list) -> dict[str, int]:
    """plan.json `cache.pipeline`: how each class's micro-batches were obtained
    (mode/pipeline_memo.py; RankTrace.pipeline_memo): classes fitted from a few micro-batches
    (misses), rebuilt from the layer store (hits), tried and executed in full (fallbacks), not
    applicable (full) or turned off (off); middle ranks rebuilt from another middle rank's
    units (shared, mode/stage_share.py)."""
    status = Counter(tr.pipeline_memo for tr in traces)
    return dict(hits=status["memo-hit"], misses=status["memo"], fallbacks=status["fallback"],
                full=status["full"], off=status["off"], shared=status["shared"])


def _op_counts(traces: list) -> dict[str, int]:
    c = {"hits": 0, "misses": 0, "bypasses": 0, "size": 0}
    for tr in traces:
        for k in ("hits", "misses", "bypasses"):
            c[k] += tr.fake_cache.get(k, 0)
        c["size"] = max(c["size"], tr.fake_cache.get("size", 0))
    return c


def _rate(c: dict[str, int]) -> float:
    n = c["hits"] + c["misses"]
    return c["hits"] / n if n else 0.0


def undispatched_summary(traces: list, cache_dir: str | None) -> dict[str, Any]:
    """plan.json `cache` for a run that rebuilt every class from the layer store: nothing was
    dispatched, so the dispatch store was neither loaded nor written (its size: not read)."""
    from simdist.cache.store import resolve_dir

    c = _op_counts(traces)
    return dict(enabled=True, dir=str(resolve_dir(cache_dir)), **dict(c, size=None),
                hit_rate=_rate(c), loaded=0, new_entries=0,
                note="nothing executed: the dispatch store was not loaded", warnings=[])


def disabled_summary(traces: list) -> dict[str, Any]:
    """plan.json `cache` for --no-cache: the in-process counters only."""
    c = _op_counts(traces)
    return dict(enabled=False, **c, hit_rate=_rate(c), warnings=[])


class RunCache:
    def __init__(self, service: Any, arg: CacheArg) -> None:
        self.service = service
        self.arg = arg
        self.bypasses: Counter = Counter()
        self.skipped: Counter = Counter()
        self.load_skipped: Counter = Counter()
        self.loaded = 0
        self.load_ms_max = 0.0
        self.encode_ms = 0.0
        self.fetch_failed = 0
        self.rank_cpu_s = 0.0
        self._pending: list = []

    @classmethod
    def start(cls, cache_dir: str | None, hardware: Any, placement: str | None = None,
              max_bytes: int | None = None) -> RunCache | None:
        """Start the service and return at once. `placement` ($SIMDIST_CACHE_SERVICE):
        "actor" (default), a CacheService actor on the driver's node that loads the store while
        the rank actors start; "driver", the same CacheService object inside the driver
        process (no extra process to start: see benchmarks/cache_warm.py for what that saves
        on a small machine)."""
        import ray
        import torch

        from simdist.cache.service import CacheService

        placement = placement or os.environ.get(ENV_PLACEMENT) or DEFAULT_PLACEMENT
        try:
            snap_id = uuid.uuid4().hex
            if placement == "driver":
                service: Any = _InDriver(CacheService(cache_dir, torch.__version__, max_bytes))
                snap = ray.put(service.obj.snapshot(hardware.name))
            else:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                node = ray.get_runtime_context().get_node_id()
                service = ray.remote(CacheService).options(
                    num_cpus=0, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
                ).remote(cache_dir, torch.__version__, max_bytes)
                snap = service.snapshot.remote(hardware.name)
        except Exception as e:  # noqa: BLE001 - the cache must never fail a run
            warnings.warn(f"simdist cache: disabled for this run ({type(e).__name__}: {e})",
                          CacheWarning, stacklevel=2)
            return None
        return cls(service, CacheArg([snap], snap_id, hardware))

    def merge(self, delta: Any) -> None:
        """Account one rank's CacheDelta and send its rows to the service (not awaited: calls
        from one caller run in order, so `finish`'s flush comes after every merge)."""
        self.bypasses.update(delta.bypasses)
        self.skipped.update(delta.skipped)
        self.load_skipped.update(delta.load_skipped)
        self.loaded += delta.loaded
        self.fetch_failed += delta.fetch_failed
        self.load_ms_max = max(self.load_ms_max, delta.load_ms)
        self.encode_ms += delta.encode_ms
        self.rank_cpu_s += delta.rank_cpu_s
        if delta.entries.num_rows or delta.costs.num_rows or delta.used:
            self._pending.append(self.service.merge.remote(delta.entries, delta.costs, delta.used))

    def end(self) -> None:
        """End the service: `finish` does after writing the store back; a failed or stopped run
        does without (a service left alive keeps its process, and the store it loaded, until
        Ray shuts down)."""
        import ray

        if not isinstance(self.service, _InDriver):
            ray.kill(self.service)

    async def finish(self, traces: list) -> dict[str, Any]:
        c = _op_counts(traces)
        try:
            for ref in self._pending:
                await ref
            info = await self.service.info.remote()  # the store as loaded at the start
            res = await self.service.flush.remote()
        except Exception as e:  # noqa: BLE001 - the service died or could not start
            warnings.warn(f"simdist cache: not written back ({type(e).__name__}: {e})",
                          CacheWarning, stacklevel=2)
            return dict(disabled_summary(traces), enabled=True, error=f"{type(e).__name__}: {e}")
        finally:
            self.end()
        for p in res.get("problems", []):
            warnings.warn(p, CacheWarning, stacklevel=2)
        return dict(
            enabled=True,
            dir=info["dir"],
            hits=c["hits"], misses=c["misses"], bypasses=c["bypasses"],
            bypasses_by_reason=dict(self.bypasses.most_common()),
            hit_rate=_rate(c),
            size=res["entries"],  # entries in the shared store after this run
            process_size=c["size"],  # largest FakeTensorMode cache of one worker
            loaded=self.loaded,  # entries installed into workers from the store
            new_entries=res["new_entries"],
            skipped=dict(self.skipped.most_common()),  # new entries that could not be encoded
            load_skipped=dict(self.load_skipped.most_common()),
            store=dict(
                entries_before=info["entries"], entries=res["entries"],
                cost_rows=res.get("cost_rows"), new_cost_rows=res.get("new_cost_rows", 0),
                files=res["files"], bytes=res["bytes"], evicted=res["evicted"],
                compacted=res["compacted"], load_ms=info["load_ms"],
                worker_load_ms=self.load_ms_max, encode_ms=self.encode_ms,
                dump_ms=res["dump_ms"], snapshot_fetch_failed=self.fetch_failed,
                rank_cpu_s=self.rank_cpu_s,  # CPU seconds of the ranks in the workers
            ),
            warnings=res.get("problems", []),
        )
