"""A pool that executes in this process, one call after another: the memo protocol
(simdist/memo.py) run without Ray, for tests and benchmarks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from simdist.mode.rank import execute_unit
from simdist.trace import RankTask, StepStreams, SymbolicDim


class LocalPool:
    """`around_rank()` makes the context entered around each execution (e.g. a RankCache's
    `around_rank`), or None."""

    def __init__(self, around_rank: Callable[[], AbstractContextManager] | None = None) -> None:
        self._around_rank = around_rank

    def execute(self, task: RankTask, keep_streams: bool = False) -> asyncio.Future:
        hook = self._around_rank() if self._around_rank is not None else None
        return _done(execute_unit(task, hook, keep_streams))

    def build(self, job: Any, runs: list[StepStreams]) -> asyncio.Future:
        return _done(job.build(runs))

    def symbolic(self, task: RankTask, dim: SymbolicDim) -> asyncio.Future:
        from simdist.mode.symbolic import execute_symbolic

        return _done(execute_symbolic(task, dim))

    async def close(self) -> None:
        return None


def _done(value: Any) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
