"""The layer memo's protocol, written once: a rank whose stages hold identical blocks is
executed three times short (mode/layer_memo.py says how and why that is exact), fitted, and
rebuilt to its depth; its model is kept in the layer store (cache/layers.py) for later runs.
`simulate_task` runs it on any pool with `execute` and `build` (workers/pool.py: the Ray
actors of a real run; workers/local.py: this process, for tests and benchmarks)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from simdist.cache.layers import LayerStore
from simdist.execution_key import execution_signature, groups_relabellable, relabel_groups
from simdist.mode.layer_memo import BASE_LAYERS, MemoShape, StreamModel, fit_stream_model, memo_shape
from simdist.mode.streams import summarize
from simdist.trace import RankTask, RankTrace, StepStreams


@dataclass(frozen=True)
class BuildResult:
    trace: RankTrace | None  # None: the short steps do not fit the memo's model
    parts: dict | None  # what to store (None: nothing new)
    seconds: float


@dataclass(frozen=True)
class MemoJob:
    """One rank through the layer memo. `stored`: its model as the layer store holds it (None:
    not stored yet; {"fallback": True}: known not to fit). Picklable: the coordinator opens the
    job where the store is (the driver) and has an actor `build` it."""
    task: RankTask
    shape: MemoShape
    key: str  # in the layer store ("" without one)
    stored: dict | None

    @property
    def fallback(self) -> bool:
        return bool(self.stored and self.stored.get("fallback"))

    def short_tasks(self) -> list[RankTask]:
        """The steps to execute (streams kept): BASE_LAYERS, +1, +2 blocks per stage, or none
        when the store has the model or knows it does not fit."""
        if self.stored is not None:
            return []
        return [replace(self.shape.reduced(self.task, BASE_LAYERS + i), layer_memo=False)
                for i in range(3)]

    def build(self, runs: list[StepStreams]) -> BuildResult:
        """The rank rebuilt from the stored model (no `runs`) or fitted to the executed short
        steps."""
        t0 = time.perf_counter()
        trace, parts = self._build(runs)
        return BuildResult(trace, parts, time.perf_counter() - t0)

    def _build(self, runs: list[StepStreams]) -> tuple[RankTrace | None, dict | None]:
        if self.fallback:
            return None, None
        if self.stored is not None:
            model, parts = StreamModel.from_parts(self.stored), None
        else:
            model = fit_stream_model(runs, self.shape.blocks)
            if model is None:
                return None, {"fallback": True}
            # Stored only where another plan of this key can relabel it exactly.
            parts = model.to_parts() if groups_relabellable(runs[0], self.task) else None
        fields = summarize(relabel_groups(model.streams(self.shape), self.task))
        return RankTrace(rank=self.task.rank, wall_s=0.0, **fields), parts

    def account(self, trace: RankTrace | None, units: list[RankTrace],
                build_s: float) -> RankTrace:
        """The rank's trace with what it cost: every execution it took (short steps, then the
        full step after a fallback: `trace` None, units[-1]) and the build."""
        if trace is None:
            trace = units[-1]
            trace.layer_memo = "fallback"
        else:
            trace.layer_memo = "memo" if units else "memo-hit"
            trace.blocks_total = self.shape.layers_per_stage * len(self.shape.stages)
        trace.blocks_executed = sum(u.blocks_executed for u in units)
        trace.wall_s = sum(u.wall_s for u in units) + build_s
        trace.fake_cache = {k: sum(u.fake_cache.get(k, 0) for u in units)
                            for k in ("hits", "misses", "bypasses")}
        trace.fake_cache["size"] = max((u.fake_cache.get("size", 0) for u in units), default=0)
        trace.streams = None
        return trace

    @property
    def executions(self) -> int:
        """Executions this rank needs: the memo's short steps, one in full (known not to fit),
        or none (its model is stored)."""
        return 1 if self.fallback else len(self.short_tasks())


def memo_key(task: RankTask) -> tuple[MemoShape, str] | None:
    """`task`'s memo shape and its model's layer-store key ("" without a store: the task has
    no cache dir); None where the memo is off or does not apply."""
    shape = memo_shape(task) if task.layer_memo else None
    if shape is None:
        return None
    store = _store(task)
    return shape, (store.key(execution_signature(shape.reduced(task, BASE_LAYERS)))
                   if store is not None else "")


def open_memo(task: RankTask) -> MemoJob | None:
    """The memo job for `task`, its model looked up in the layer store; None where the memo is
    off or does not apply (execute in full)."""
    found = memo_key(task)
    if found is None:
        return None
    shape, key = found
    return MemoJob(task, shape, key, _store(task).get(key) if key else None)


def store_memo(job: MemoJob, parts: dict | None) -> None:
    """Keep a newly fitted model (or the fact that the rank does not fit) for later runs."""
    store = _store(job.task)
    if parts is not None and store is not None:
        store.put(job.key, parts)


def _store(task: RankTask) -> LayerStore | None:
    return (LayerStore.open(task.layer_cache_dir, torch.__version__)
            if task.layer_cache_dir else None)


class Pool(Protocol):
    def execute(self, task: RankTask, keep_streams: bool = False) -> asyncio.Future: ...
    def build(self, job: MemoJob, runs: list[StepStreams]) -> asyncio.Future: ...


def executions(job: MemoJob | None) -> int:
    """Executions a rank needs (see MemoJob.executions); one in full without a memo job."""
    return 1 if job is None else job.executions


async def simulate_task(pool: Pool, task: RankTask, job: MemoJob | None) -> RankTrace:
    """One rank: executed in full (`job` None), or through its memo job — the short steps side
    by side, the build, the store, and a full execution where the short steps do not fit."""
    if job is None:
        return await pool.execute(task)
    units = list(await asyncio.gather(*(pool.execute(t, keep_streams=True)
                                        for t in job.short_tasks())))
    result = BuildResult(None, None, 0.0) if job.fallback else await pool.build(
        job, [u.streams for u in units])
    store_memo(job, result.parts)
    if result.trace is None:  # the short steps do not fit the memo's model: execute in full
        units.append(await pool.execute(task))
    return job.account(result.trace, units, result.seconds)


def simulate_rank(task: RankTask, around_rank: Any = None) -> RankTrace:
    """One rank, start to end in this process (tests, benchmarks): the same protocol as
    `simdist run`, on a pool that executes here. `around_rank`: see workers/local.py."""
    from simdist.workers.local import LocalPool

    async def run() -> RankTrace:
        return await simulate_task(LocalPool(around_rank), task, open_memo(task))

    return asyncio.run(run())
