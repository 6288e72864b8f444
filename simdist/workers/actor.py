"""The Ray actor that simulates ranks. One execution at a time per process (one default process
group per process); torch stays imported and warm between calls."""

from __future__ import annotations

import os
from typing import Any

import ray

from simdist.trace import StepStreams
from simdist.trace import RankTask, RankTrace, SymbolicDim, SymbolicTrace


class RankWorker:
    def __init__(self) -> None:
        # Import (and so warm) the simulation stack once per actor, not once per rank.
        import simdist.cache.warm  # noqa: F401  (shared dispatch cache)
        import simdist.mode.rank  # noqa: F401

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._cache = None  # simdist.cache.warm.RankCache, created by the first simulate_cached

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def simulate(self, task: RankTask, keep_streams: bool = False,
                 cache_arg: Any = None) -> tuple[RankTrace, str, Any]:
        """Execute `task` as it is (a full rank, or one of a memo's short steps).
        `cache_arg` (simdist.cache.run.CacheArg, None with --no-cache): FakeTensorMode's cache
        is warmed from the store's snapshot (fetched once per snapshot per actor) and the
        execution's CacheDelta is returned for the CacheService."""
        from simdist.mode.rank import execute_unit

        if cache_arg is None:
            return execute_unit(task, keep_streams=keep_streams), self.node_id(), None
        from simdist.cache.warm import RankCache

        if self._cache is None:
            self._cache = RankCache()
        self._cache.fetch(cache_arg)
        trace = execute_unit(task, self._cache.around_rank(), keep_streams)
        return trace, self.node_id(), self._cache.last_delta

    def build(self, job: Any, runs: list[StepStreams]) -> tuple[Any, str]:
        """A memo job's rank or step rebuilt from its stored model or fitted to its executed
        short steps (simdist.memo.MemoJob / PipelineJob.build: a BuildResult)."""
        return job.build(runs), self.node_id()

    def symbolic(self, task: RankTask, dim: SymbolicDim) -> tuple[SymbolicTrace, str]:
        """`task`'s step with `dim` a size symbol (simdist.mode.symbolic: the memory stream as
        expressions); never through the shared dispatch cache."""
        from simdist.mode.symbolic import execute_symbolic

        return execute_symbolic(task, dim), self.node_id()
