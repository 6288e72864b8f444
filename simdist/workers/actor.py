"""The Ray actor that simulates ranks. One execution at a time per process (one default process
group per process); torch stays imported and warm between calls."""

from __future__ import annotations

import os

import ray

from simdist.mode.streams import StepStreams
from simdist.mode.trace import RankTask, RankTrace


class RankWorker:
    def __init__(self) -> None:
        # Import (and so warm) the simulation stack once per actor, not once per rank.
        import simdist.cache.warm  # noqa: F401  (shared dispatch cache)
        import simdist.mode.rank  # noqa: F401

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._cache = None  # simdist.cache.warm.RankCache, created by the first simulate_cached

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def simulate(self, task: RankTask, keep_streams: bool = False) -> tuple[RankTrace, str]:
        """Execute `task` as it is (a full rank, or one of the layer memo's short steps)."""
        from simdist.mode.rank import execute_unit

        return execute_unit(task, keep_streams=keep_streams), self.node_id()

    def build(self, job, runs: list[StepStreams]) -> tuple[RankTrace | None, dict | None, float, str]:  # noqa: ANN001
        """A layer-memo rank rebuilt from its stored model or fitted to its executed short steps
        (simdist.mode.rank.MemoJob.build), and the seconds that took."""
        return (*job.build(runs), self.node_id())

    # --- shared dispatch cache (simdist/cache) ---
    def simulate_cached(self, task: RankTask, cache_arg,  # noqa: ANN001
                        keep_streams: bool = False) -> tuple[RankTrace, str, object]:
        """`simulate` with FakeTensorMode's cache warmed from the store's snapshot (fetched once
        per snapshot per actor); also returns the execution's CacheDelta for the CacheService."""
        from simdist.cache.warm import RankCache
        from simdist.mode.rank import execute_unit

        if self._cache is None:
            self._cache = RankCache()
        self._cache.fetch(cache_arg)
        trace = execute_unit(task, cache=self._cache, keep_streams=keep_streams)
        return trace, self.node_id(), self._cache.last_delta
    # --- end shared dispatch cache ---
