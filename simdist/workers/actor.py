"""The Ray actor that simulates ranks. One rank at a time per process (one default process group
per process); torch stays imported and warm between calls."""

from __future__ import annotations

import os

import ray

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

    def simulate(self, task: RankTask) -> tuple[RankTrace, str]:
        from simdist.mode.rank import simulate_rank

        return simulate_rank(task), self.node_id()

    # --- shared dispatch cache (simdist/cache) ---
    def simulate_cached(self, task: RankTask, cache_arg) -> tuple[RankTrace, str, object]:  # noqa: ANN001
        """`simulate` with FakeTensorMode's cache warmed from the store's snapshot (fetched once
        per snapshot per actor); also returns the rank's CacheDelta for the CacheService."""
        from simdist.cache.warm import RankCache
        from simdist.mode.rank import simulate_rank

        if self._cache is None:
            self._cache = RankCache()
        self._cache.fetch(cache_arg)
        trace = simulate_rank(task, cache=self._cache)
        return trace, self.node_id(), self._cache.last_delta
    # --- end shared dispatch cache ---
