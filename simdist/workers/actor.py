"""The Ray actor that simulates ranks. One rank at a time per process (one default process group
per process); torch stays imported and warm between calls."""

from __future__ import annotations

import os

import ray

from simdist.mode.trace import RankTask, RankTrace


class RankWorker:
    def __init__(self) -> None:
        # Import (and so warm) the simulation stack once per actor, not once per rank.
        import simdist.mode.rank  # noqa: F401

        os.environ.setdefault("OMP_NUM_THREADS", "1")

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def simulate(self, task: RankTask) -> tuple[RankTrace, str]:
        from simdist.mode.rank import simulate_rank

        return simulate_rank(task), self.node_id()
