"""Coordinator side of the shared cache for one run: start the CacheService actor (on the
driver's node, so the store is the user's cache dir), give workers the snapshot, merge what they
return, write back at the end and fill plan.json `cache`.

Any failure of the cache (unwritable dir, actor death) is a warning and an empty cache, never a
failed simulation.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from simdist.cache.store import CacheWarning


@dataclass(frozen=True)
class CacheArg:
    """Passed to RankWorker.simulate_cached: the snapshot ref stays wrapped in a list so Ray
    does not resolve it; the worker fetches it only when it has not installed this snapshot."""

    snapshot: list  # [ObjectRef[Snapshot]]
    snapshot_id: str
    hardware: Any  # GPUSpec: cost rows are computed for it


def _layer() -> dict[str, int]:
    # The layer memo (identical layers simulated once) reports here; not built yet.
    return {"hits": 0, "misses": 0, "size": 0}


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


def disabled_summary(traces: list) -> dict[str, Any]:
    """plan.json `cache` for --no-cache: the in-process counters only."""
    c = _op_counts(traces)
    return dict(enabled=False, **c, hit_rate=_rate(c), layer=_layer())


class RunCache:
    def __init__(self, service: Any, arg: CacheArg, info: dict[str, Any]) -> None:
        self.service = service
        self.arg = arg
        self.info = info
        self.bypasses: Counter = Counter()
        self.skipped: Counter = Counter()
        self.load_skipped: Counter = Counter()
        self.loaded = 0
        self.load_ms_max = 0.0
        self.encode_ms = 0.0
        self.problems: list[str] = list(info.get("problems", []))

    @classmethod
    async def start(cls, cache_dir: str | None, hardware: Any,
                    max_bytes: int | None = None) -> RunCache | None:
        import ray
        import torch
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from simdist.cache.service import CacheService

        try:
            node = ray.get_runtime_context().get_node_id()
            service = ray.remote(CacheService).options(
                num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            ).remote(cache_dir, torch.__version__, max_bytes)
            ref, snap_id = await service.snapshot.remote(hardware.name)
            info = await service.info.remote()
        except Exception as e:  # noqa: BLE001 - the cache must never fail a run
            warnings.warn(f"simdist cache: disabled for this run ({type(e).__name__}: {e})",
                          CacheWarning, stacklevel=2)
            return None
        for p in info.get("problems", []):
            warnings.warn(p, CacheWarning, stacklevel=2)
        return cls(service, CacheArg([ref], snap_id, hardware), info)

    async def merge(self, delta: Any) -> None:
        self.bypasses.update(delta.bypasses)
        self.skipped.update(delta.skipped)
        self.load_skipped.update(delta.load_skipped)
        self.loaded += delta.loaded
        self.load_ms_max = max(self.load_ms_max, delta.load_ms)
        self.encode_ms += delta.encode_ms
        if delta.entries.num_rows or delta.costs.num_rows or delta.used:
            await self.service.merge.remote(delta.entries, delta.costs, delta.used)

    async def finish(self, traces: list) -> dict[str, Any]:
        import ray

        try:
            res = await self.service.flush.remote()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"simdist cache: write-back failed ({type(e).__name__}: {e})",
                          CacheWarning, stacklevel=2)
            res = dict(new_entries=0, entries=self.info["entries"], bytes=self.info["bytes"],
                       files=self.info["files"], dump_ms=0.0, evicted=0, compacted=False,
                       problems=self.problems + [f"write-back failed: {e}"])
        finally:
            ray.kill(self.service)
        for p in res.get("problems", [])[len(self.problems):]:
            warnings.warn(p, CacheWarning, stacklevel=2)
        c = _op_counts(traces)
        return dict(
            enabled=True,
            dir=self.info["dir"],
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
                entries_before=self.info["entries"], entries=res["entries"],
                cost_rows=res.get("cost_rows"), new_cost_rows=res.get("new_cost_rows", 0),
                files=res["files"], bytes=res["bytes"], evicted=res["evicted"],
                compacted=res["compacted"], load_ms=self.info["load_ms"],
                worker_load_ms=self.load_ms_max, encode_ms=self.encode_ms,
                dump_ms=res["dump_ms"],
            ),
            warnings=res.get("problems", []),
            layer=_layer(),
        )
