"""The memo protocol, written once. Two memos rebuild a rank's step from cheaper executions:

- the layer memo (mode/layer_memo.py): a rank whose stages hold identical blocks is executed
  with 2, 3 and 4 blocks per stage, fitted and rebuilt to its depth (`MemoJob`);
- the pipeline memo (mode/pipeline_memo.py): a pipeline step of N micro-batches is executed
  with a few, fitted, verified on a longer count and rebuilt for N (`PipelineJob`).

They compose: the layer memo's short steps are pipeline steps of N micro-batches, each obtained
through the pipeline memo (the first, shortest one verified); a rank too shallow for the layer
memo goes through the pipeline memo alone. Fitted models are kept in the layer store
(cache/layers.py) for later runs. `simulate_task` runs the protocol on any pool with `execute`
and `build` (workers/pool.py: the Ray actors of a real run; workers/local.py: this process, for
tests and benchmarks)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import torch

from simdist.cache.layers import LayerStore
from simdist.execution_key import execution_signature, groups_relabellable, relabel_groups
from simdist.mode.layer_memo import (BASE_LAYERS, MemoShape, StreamModel, fit_stream_model,
                                     memo_shape, rank_blocks)
from simdist.mode.pipeline_memo import (FORMAT as PIPELINE_FORMAT, FitError, MemoCounts,
                                        PipelineModel, PipelineShape, fit_pipeline_model,
                                        memo_counts, same_streams)
from simdist.mode.streams import summarize
from simdist.trace import RankTask, RankTrace, StepStreams


@dataclass(frozen=True)
class BuildResult:
    trace: RankTrace | None  # None: the executions do not fit the memo's model (or `streams`)
    parts: dict | None  # what to store (None: nothing new)
    seconds: float
    # A pipeline job for a layer memo's short step answers its rebuilt streams instead.
    streams: StepStreams | None = None


# --- the pipeline memo -----------------------------------------------------------------------------

class PipelineKey(NamedTuple):
    """What a pipeline memo model depends on (its layer store key): the task without its
    micro-batch count, and the counts it is fitted to and verified on."""
    format: int
    task: RankTask
    counts: MemoCounts


@dataclass(frozen=True)
class PipelineJob:
    """One pipeline step (`task`, of N micro-batches) through the pipeline memo. `stored`: its
    model as the layer store holds it (None: not stored yet; {"fallback": True}: known not to
    fit). `streams_only`: the step is a layer memo's short step (the build answers streams)."""
    task: RankTask
    shape: PipelineShape
    counts: MemoCounts
    key: str
    stored: dict | None
    streams_only: bool = False

    @property
    def fallback(self) -> bool:
        return bool(self.stored and self.stored.get("fallback"))

    def short_tasks(self) -> list[RankTask]:
        """The steps to execute (streams kept): the fitting and verifying counts, or none when
        the store has the model or knows it does not fit."""
        if self.stored is not None:
            return []
        return [replace(self.task, num_microbatches=n) for n in self.counts.all()]

    @property
    def executions(self) -> int:
        return 1 if self.fallback else len(self.short_tasks())

    def build(self, runs: list[StepStreams]) -> BuildResult:
        """The step rebuilt from the stored model (no `runs`) or fitted to the executed counts
        and verified on the longer one."""
        t0 = time.perf_counter()
        streams, parts = self._streams(runs)
        trace = None
        if streams is not None and not self.streams_only:
            trace = RankTrace(rank=self.task.rank, wall_s=0.0, **summarize(streams))
            streams = None
        return BuildResult(trace, parts, time.perf_counter() - t0, streams)

    def _streams(self, runs: list[StepStreams]) -> tuple[StepStreams | None, dict | None]:
        if self.fallback:
            return None, None
        parts = None
        try:
            if self.stored is not None:
                model = PipelineModel.from_parts(self.stored)
            else:
                model = fit_pipeline_model(self.shape, list(zip(self.counts.fit, runs)))
                if self.counts.verify is not None and not same_streams(
                        model.streams(self.counts.verify), runs[2]):
                    raise FitError(f"the step of {self.counts.verify} micro-batches is not "
                                   "the one the model rebuilds")
                parts = model.to_parts()
            return model.streams(self.task.num_microbatches), parts
        except FitError:
            return None, {"fallback": True} if self.stored is None else None

    @property
    def status(self) -> str:
        return "fallback" if self.fallback else "memo-hit" if self.stored is not None else "memo"


def pipeline_shape(task: RankTask) -> PipelineShape | None:
    par = task.parallel
    if par.pp == 1:
        return None
    return PipelineShape(par.pp_schedule, par.pp, par.stages, task.layout.coords(task.rank)["pp"])


def open_pipeline(task: RankTask, verify: bool = True,
                  streams_only: bool = False) -> PipelineJob | None:
    """The pipeline memo job for `task`, its model looked up in the layer store; None where the
    memo is off or does not apply (execute in full)."""
    shape = pipeline_shape(task) if task.pipeline_memo else None
    counts = memo_counts(shape, task.num_microbatches, verify) if shape is not None else None
    if counts is None:
        return None
    store = _store(task)
    if store is None:
        return PipelineJob(task, shape, counts, "", None, streams_only)
    key = store.key(PipelineKey(PIPELINE_FORMAT, replace(task, num_microbatches=0,
                                                         layer_cache_dir=None), counts))
    return PipelineJob(task, shape, counts, key, store.get(key), streams_only)


def _pipeline_status(task: RankTask, statuses: list[str]) -> str:
    """One status for the pipeline steps a rank obtained (see RankTrace.pipeline_memo)."""
    if not task.pipeline_memo and task.parallel.pp > 1:
        return "off"
    for s in ("fallback", "memo", "memo-hit"):
        if s in statuses:
            return s
    return "full"


# --- the layer memo --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoJob:
    """One rank through the layer memo. `stored`: its model as the layer store holds it (None:
    not stored yet; {"fallback": True}: known not to fit). `pipelines`: how each short step is
    obtained (a pipeline job, or None: executed). Picklable: the coordinator opens the job where
    the store is (the driver) and has an actor `build` it."""
    task: RankTask
    shape: MemoShape
    key: str  # in the layer store ("" without one)
    stored: dict | None
    pipelines: tuple[PipelineJob | None, ...] = ()

    @property
    def fallback(self) -> bool:
        return bool(self.stored and self.stored.get("fallback"))

    def short_tasks(self) -> list[RankTask]:
        """The short steps (BASE_LAYERS, +1, +2 blocks per stage), or none when the store has
        the model or knows it does not fit."""
        if self.stored is not None:
            return []
        return _short_tasks(self.task, self.shape)

    def short_jobs(self) -> list[tuple[RankTask, PipelineJob | None]]:
        """Each short step with its pipeline job (None: executed as it is)."""
        tasks = self.short_tasks()
        return list(zip(tasks, self.pipelines or (None,) * len(tasks)))

    def build(self, runs: list[StepStreams]) -> BuildResult:
        """The rank rebuilt from the stored model (no `runs`) or fitted to the short steps."""
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

    @property
    def executions(self) -> int:
        """Executions this rank needs: the memo's short steps (or their pipeline memo's), one in
        full (known not to fit), or none (its model is stored)."""
        if self.fallback:
            return 1
        return sum(1 if j is None else j.executions for _, j in self.short_jobs())


def _short_tasks(task: RankTask, shape: MemoShape) -> list[RankTask]:
    return [replace(shape.reduced(task, BASE_LAYERS + i), layer_memo=False) for i in range(3)]


def memo_key(task: RankTask) -> tuple[MemoShape, str] | None:
    """`task`'s layer memo shape and its model's layer-store key ("" without a store: the task
    has no cache dir); None where the layer memo is off or does not apply."""
    shape = memo_shape(task) if task.layer_memo else None
    if shape is None:
        return None
    store = _store(task)
    return shape, (store.key(execution_signature(shape.reduced(task, BASE_LAYERS)))
                   if store is not None else "")


def open_memo(task: RankTask) -> MemoJob | PipelineJob | None:
    """The memo job for `task`, its models looked up in the layer store: the layer memo's (its
    short steps through the pipeline memo where that applies), else the pipeline memo's; None
    where neither applies (execute in full)."""
    found = memo_key(task)
    if found is None:
        return open_pipeline(task)
    shape, key = found
    stored = _store(task).get(key) if key else None
    pipelines = () if stored is not None else tuple(
        open_pipeline(t, verify=i == 0, streams_only=True)  # verified on the shortest
        for i, t in enumerate(_short_tasks(task, shape)))
    return MemoJob(task, shape, key, stored, pipelines)


def store_memo(job: MemoJob | PipelineJob, parts: dict | None) -> None:
    """Keep a newly fitted model (or the fact that the rank does not fit) for later runs."""
    store = _store(job.task)
    if parts is not None and store is not None:
        store.put(job.key, parts)


def _store(task: RankTask) -> LayerStore | None:
    return (LayerStore.open(task.layer_cache_dir, torch.__version__)
            if task.layer_cache_dir else None)


# --- the protocol on a pool ------------------------------------------------------------------------

class Pool(Protocol):
    def execute(self, task: RankTask, keep_streams: bool = False) -> asyncio.Future: ...
    def build(self, job: Any, runs: list[StepStreams]) -> asyncio.Future: ...


def executions(job: MemoJob | PipelineJob | None) -> int:
    """Executions a rank needs (see MemoJob / PipelineJob.executions); one in full without a
    memo job."""
    return 1 if job is None else job.executions


@dataclass
class _Cost:
    """What a rank's memo jobs took: every execution, the builds' seconds, and the outcome of
    each pipeline job (memo / memo-hit / fallback)."""
    units: list[RankTrace] = field(default_factory=list)
    build_s: float = 0.0
    pipelines: list[str] = field(default_factory=list)

    def account(self, trace: RankTrace) -> RankTrace:
        """`trace` with what it cost."""
        trace.blocks_executed = sum(u.blocks_executed for u in self.units)
        trace.wall_s = sum(u.wall_s for u in self.units) + self.build_s
        trace.fake_cache = {k: sum(u.fake_cache.get(k, 0) for u in self.units)
                            for k in ("hits", "misses", "bypasses")}
        trace.fake_cache["size"] = max((u.fake_cache.get("size", 0) for u in self.units),
                                       default=0)
        trace.streams = None
        return trace


async def _through_pipeline(pool: Pool, job: PipelineJob, cost: _Cost) -> BuildResult:
    """A pipeline job's executions side by side, its build and its store."""
    executed = list(await asyncio.gather(*(pool.execute(t, keep_streams=True)
                                           for t in job.short_tasks())))
    result = BuildResult(None, None, 0.0) if job.fallback else await pool.build(
        job, [u.streams for u in executed])
    store_memo(job, result.parts)
    for u in executed:
        u.streams = None
    cost.units.extend(executed)
    cost.build_s += result.seconds
    built = result.trace is not None or result.streams is not None
    cost.pipelines.append(job.status if built else "fallback")
    return result


async def _short_streams(pool: Pool, task: RankTask, job: PipelineJob | None,
                         cost: _Cost) -> StepStreams:
    """A layer memo's short step: through its pipeline job, executed where that falls back or
    where there is none."""
    if job is not None:
        result = await _through_pipeline(pool, job, cost)
        if result.streams is not None:
            return result.streams
    unit = await pool.execute(task, keep_streams=True)
    cost.units.append(unit)
    return unit.streams


async def _full(pool: Pool, task: RankTask, job: PipelineJob | None, cost: _Cost) -> RankTrace:
    """`task` with all its blocks: through its pipeline job where it has one, executed (every
    micro-batch) where that does not fit or where there is none."""
    trace = None
    if job is not None:
        trace = (await _through_pipeline(pool, job, cost)).trace
        if trace is not None:
            trace.blocks_total = rank_blocks(task)
    if trace is None:
        trace = await pool.execute(task)
        cost.units.append(trace)
    trace.pipeline_memo = _pipeline_status(task, cost.pipelines)
    return trace


async def simulate_task(pool: Pool, task: RankTask, job: MemoJob | PipelineJob | None) -> RankTrace:
    """One rank: executed in full (`job` None), or through its memo job — the executions side
    by side, the builds, the store, and a full execution where a memo does not fit."""
    cost = _Cost()
    if not isinstance(job, MemoJob):
        trace = await _full(pool, task, job, cost)
        return trace if job is None else cost.account(trace)
    short = list(await asyncio.gather(*(_short_streams(pool, t, j, cost)
                                        for t, j in job.short_jobs())))
    # (the build needs none of the pipeline jobs, which may carry stored models)
    result = BuildResult(None, None, 0.0) if job.fallback else await pool.build(
        replace(job, pipelines=()), short)
    cost.build_s += result.seconds
    store_memo(job, result.parts)
    trace = result.trace
    if trace is None:  # the short steps do not fit the layer memo's model: all blocks
        trace = await _full(pool, task, open_pipeline(task), cost)
        trace.layer_memo = "fallback"
    else:
        trace.layer_memo = "memo" if cost.units else "memo-hit"
        trace.blocks_total = job.shape.layers_per_stage * len(job.shape.stages)
        trace.pipeline_memo = _pipeline_status(task, cost.pipelines)
    return cost.account(trace)


def account_stored(job: MemoJob, trace: RankTrace, seconds: float) -> RankTrace:
    """A layer-memo hit's `trace` obtained outside the protocol (simdist/rebuilt.py reads it as
    the layer store keeps it), accounted as `simulate_task` accounts a memo hit."""
    trace.layer_memo = "memo-hit"
    trace.blocks_total = job.shape.layers_per_stage * len(job.shape.stages)
    trace.pipeline_memo = _pipeline_status(job.task, [])
    return _Cost(build_s=seconds).account(trace)


def simulate_rank(task: RankTask, around_rank: Any = None) -> RankTrace:
    """One rank, start to end in this process (tests, benchmarks): the same protocol as
    `simdist run`, on a pool that executes here. `around_rank`: see workers/local.py."""
    from simdist.workers.local import LocalPool

    async def run() -> RankTrace:
        return await simulate_task(LocalPool(around_rank), task, open_memo(task))

    return asyncio.run(run())
