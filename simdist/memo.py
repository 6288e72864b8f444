"""The memo protocol, written once. Two memos rebuild a rank's step from cheaper executions:

- the layer memo (mode/layer_memo.py): a rank whose stages hold identical blocks is executed
  with 2, 3 and 4 blocks per stage, fitted and rebuilt to its depth (`MemoJob`);
- the pipeline memo (mode/pipeline_memo.py): a pipeline step of N micro-batches is executed
  with a few, fitted, verified on a longer count and rebuilt for N (`PipelineJob`).

They compose layer memo first (`LayeredPipelineJob`): at each of the few micro-batch counts the
pipeline memo executes, the step of full depth is rebuilt by the layer memo from its 2-, 3- and
4-block steps; the pipeline memo fits those steps and rebuilds the rank's own count. So every
fit reads steps of a few blocks or a few micro-batches, never of the rank's count (fitting the
layer memo to steps of N micro-batches made it grow with N). A rank too shallow for the layer
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
from simdist.mode.stage_share import rebuild, share_key, unit_keys_of, unit_model
from simdist.mode.streams import summarize
from simdist.trace import RankTask, RankTrace, StepStreams


@dataclass(frozen=True)
class BuildResult:
    trace: RankTrace | None  # None: the executions do not fit the memo's model (or `streams`)
    parts: dict | None  # what to store (None: nothing new)
    seconds: float
    # A layer memo job for one of a LayeredPipelineJob's steps answers its streams instead.
    streams: StepStreams | None = None
    # A job asked to `share` (the source of other middle ranks, mode/stage_share.py): the
    # units of the step it rebuilt (None: they do not give the step back).
    units: PipelineModel | None = None


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
    fit)."""
    task: RankTask
    shape: PipelineShape
    counts: MemoCounts
    key: str
    stored: dict | None
    share: bool = False  # answer the step's units too (BuildResult.units)

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
        streams, parts, model = self._streams(runs)
        trace = (RankTrace(rank=self.task.rank, wall_s=0.0, **summarize(streams))
                 if streams is not None else None)
        # the units other middle ranks take: the fitted model's (verified on this rank)
        units = model if self.share and streams is not None else None
        return BuildResult(trace, parts, time.perf_counter() - t0, units=units)

    def _streams(self, runs: list[StepStreams]
                 ) -> tuple[StepStreams | None, dict | None, PipelineModel | None]:
        if self.fallback:
            return None, None, None
        parts = None
        try:
            if self.stored is not None:
                model = PipelineModel.from_parts(self.stored)
            else:
                model = fit_pipeline_model(self.shape, list(zip(self.counts.fit, runs)))
                if not same_streams(model.streams(self.counts.verify), runs[2]):
                    raise FitError(f"the step of {self.counts.verify} micro-batches is not "
                                   "the one the model rebuilds")
                parts = model.to_parts()
            return model.streams(self.task.num_microbatches), parts, model
        except FitError:
            return None, {"fallback": True} if self.stored is None else None, None

    @property
    def status(self) -> str:
        return "fallback" if self.fallback else "memo-hit" if self.stored is not None else "memo"


def pipeline_shape(task: RankTask) -> PipelineShape | None:
    return PipelineShape.of(task) if task.parallel.pp > 1 else None


def open_pipeline(task: RankTask) -> PipelineJob | None:
    """The pipeline memo job for `task`, its model looked up in the layer store; None where the
    memo is off or does not apply (execute in full)."""
    shape = pipeline_shape(task) if task.pipeline_memo else None
    counts = memo_counts(shape, task.num_microbatches) if shape is not None else None
    if counts is None:
        return None
    store = _store(task)
    if store is None:
        return PipelineJob(task, shape, counts, "", None)
    key = store.key(PipelineKey(PIPELINE_FORMAT, replace(task, num_microbatches=0,
                                                         layer_cache_dir=None), counts))
    return PipelineJob(task, shape, counts, key, store.get(key))


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
    not stored yet; {"fallback": True}: known not to fit). `streams_only`: the step is one of a
    LayeredPipelineJob's few-micro-batch steps (the build answers its streams). Picklable: the
    coordinator opens the job where the store is (the driver) and has an actor `build` it."""
    task: RankTask
    shape: MemoShape
    key: str  # in the layer store ("" without one)
    stored: dict | None
    streams_only: bool = False
    share: bool = False  # answer the step's units too (BuildResult.units)

    @property
    def fallback(self) -> bool:
        return bool(self.stored and self.stored.get("fallback"))

    def short_tasks(self) -> list[RankTask]:
        """The short steps (BASE_LAYERS, +1, +2 blocks per stage), or none when the store has
        the model or knows it does not fit."""
        if self.stored is not None:
            return []
        return _short_tasks(self.task, self.shape)

    def build(self, runs: list[StepStreams]) -> BuildResult:
        """The rank rebuilt from the stored model (no `runs`) or fitted to the short steps."""
        t0 = time.perf_counter()
        streams, parts = self._streams(runs)
        trace = units = None
        if streams is not None and not self.streams_only:
            trace = RankTrace(rank=self.task.rank, wall_s=0.0, **summarize(streams))
            units = _units(self.task, streams) if self.share else None
            streams = None
        return BuildResult(trace, parts, time.perf_counter() - t0, streams, units)

    def _streams(self, runs: list[StepStreams]) -> tuple[StepStreams | None, dict | None]:
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
        return relabel_groups(model.streams(self.shape), self.task), parts

    @property
    def executions(self) -> int:
        """Executions this rank needs: the memo's short steps, one in full (known not to fit),
        or none (its model is stored)."""
        return 1 if self.fallback else len(self.short_tasks())


@dataclass(frozen=True)
class LayeredPipelineJob:
    """A pipelined rank whose stages hold identical blocks, through both memos: `layers` rebuild
    the full-depth step at each of the pipeline memo's counts (in `pipeline.counts.all()`
    order; none when `pipeline` is stored), `pipeline` fits those steps and rebuilds the rank's
    count."""
    pipeline: PipelineJob
    shape: MemoShape
    layers: tuple[MemoJob, ...]

    @property
    def task(self) -> RankTask:
        return self.pipeline.task

    @property
    def executions(self) -> int:
        if self.pipeline.stored is not None:
            return 1 if self.pipeline.fallback else 0
        return sum(j.executions for j in self.layers)


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


def open_memo(task: RankTask) -> MemoJob | PipelineJob | LayeredPipelineJob | None:
    """The memo job for `task`, its models looked up in the layer store: both memos where both
    apply, else the one that does; None where neither applies (execute in full)."""
    found = memo_key(task)
    pipeline = open_pipeline(task)
    if found is None:
        return pipeline
    if pipeline is None:
        return _layer_job(task, *found)
    layers = () if pipeline.stored is not None else tuple(
        _layer_job(t, *memo_key(t), streams_only=True)
        for t in (replace(task, num_microbatches=n) for n in pipeline.counts.all()))
    return LayeredPipelineJob(pipeline, found[0], layers)


def _layer_job(task: RankTask, shape: MemoShape, key: str, streams_only: bool = False) -> MemoJob:
    stored = _store(task).get(key) if key else None
    if streams_only and stored is not None and "short.boundaries" not in stored \
            and not stored.get("fallback"):
        stored = None  # kept before models had boundaries: no steps for a pipeline memo
    return MemoJob(task, shape, key, stored, streams_only)


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
    each pipeline job (memo / memo-hit / fallback). `share`: the rank is the source of other
    middle ranks (mode/stage_share.py), and `units` what it gives them."""
    units: list[RankTrace] = field(default_factory=list)
    build_s: float = 0.0
    pipelines: list[str] = field(default_factory=list)
    share: bool = False
    shared: PipelineModel | None = None

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

    def executed(self, task: RankTask, trace: RankTrace) -> RankTrace:
        """`trace`, `task` executed in full (its streams kept when it shares: its units are
        made here)."""
        self.units.append(trace)
        if self.share and trace.streams is not None:
            self.shared = _units(task, trace.streams)
        trace.streams = None
        return trace


def _units(task: RankTask, streams: StepStreams) -> PipelineModel | None:
    """The units of `task`'s step for other middle ranks, or None where they do not give it
    back (then those ranks are simulated on their own)."""
    try:
        return unit_model(task, streams)
    except FitError:
        return None


async def _executed_streams(pool: Pool, task: RankTask, cost: _Cost) -> StepStreams:
    """`task` executed as it is; its streams."""
    unit = await pool.execute(task, keep_streams=True)
    streams, unit.streams = unit.streams, None
    cost.units.append(unit)
    return streams


async def _execute(pool: Pool, task: RankTask, cost: _Cost) -> RankTrace:
    """`task` executed in full, every micro-batch."""
    return cost.executed(task, await pool.execute(task, keep_streams=cost.share))


async def _memo_build(pool: Pool, job: MemoJob | PipelineJob, cost: _Cost,
                      runs: list[StepStreams] | None = None) -> BuildResult:
    """A memo job built from `runs` (its steps obtained elsewhere) or from its own executions,
    side by side (None); stored."""
    if runs is None:
        runs = list(await asyncio.gather(*(_executed_streams(pool, t, cost)
                                           for t in job.short_tasks())))
    if cost.share:  # (a streams-only step of a LayeredPipelineJob answers no units)
        job = replace(job, share=True)
    result = BuildResult(None, None, 0.0) if job.fallback else await pool.build(job, runs)
    store_memo(job, result.parts)
    cost.build_s += result.seconds
    if result.units is not None:
        cost.shared = result.units
    return result


async def _through_pipeline(pool: Pool, job: PipelineJob, runs: list[StepStreams] | None,
                            cost: _Cost) -> RankTrace | None:
    """A pipeline job's trace (see _memo_build for `runs`), or None where the model does not
    fit."""
    result = await _memo_build(pool, job, cost, runs)
    cost.pipelines.append(job.status if result.trace is not None else "fallback")
    return result.trace


async def _full(pool: Pool, task: RankTask, job: PipelineJob | None, cost: _Cost) -> RankTrace:
    """`task` with all its blocks: through its pipeline job where it has one, executed (every
    micro-batch) where that does not fit or where there is none."""
    trace = await _through_pipeline(pool, job, None, cost) if job is not None else None
    if trace is not None:
        trace.blocks_total = rank_blocks(task)
    else:
        trace = await _execute(pool, task, cost)
    trace.pipeline_memo = _pipeline_status(task, cost.pipelines)
    return trace


async def _layered_step(pool: Pool, job: MemoJob, cost: _Cost) -> StepStreams:
    """The full-depth step at one of a pipeline memo's few counts: through the layer memo,
    executed where that does not fit."""
    streams = (await _memo_build(pool, job, cost)).streams
    return streams if streams is not None else await _executed_streams(pool, job.task, cost)


def _memo_status(trace: RankTrace, shape: MemoShape, task: RankTask, cost: _Cost) -> None:
    trace.layer_memo = "memo" if cost.units else "memo-hit"
    trace.blocks_total = shape.layers_per_stage * len(shape.stages)
    trace.pipeline_memo = _pipeline_status(task, cost.pipelines)


async def simulate_task(pool: Pool, task: RankTask,
                        job: MemoJob | PipelineJob | LayeredPipelineJob | None) -> RankTrace:
    """One rank: executed in full (`job` None), or through its memo job — the executions side
    by side, the builds, the store, and a full execution where a memo does not fit."""
    return await _simulate(pool, task, job, _Cost())


async def _simulate(pool: Pool, task: RankTask,
                    job: MemoJob | PipelineJob | LayeredPipelineJob | None,
                    cost: _Cost) -> RankTrace:
    if isinstance(job, LayeredPipelineJob):
        steps = None
        if job.pipeline.stored is None:
            steps = list(await asyncio.gather(*(_layered_step(pool, j, cost)
                                                for j in job.layers)))
        trace = await _through_pipeline(pool, job.pipeline, steps, cost)
        if trace is None:  # the few-micro-batch steps do not fit the pipeline memo's model
            trace = await _execute(pool, task, cost)
            trace.layer_memo = "fallback"
            trace.pipeline_memo = _pipeline_status(task, cost.pipelines)
        else:
            _memo_status(trace, job.shape, task, cost)
        return cost.account(trace)
    if not isinstance(job, MemoJob):
        trace = await _full(pool, task, job, cost)
        return trace if job is None else cost.account(trace)
    trace = (await _memo_build(pool, job, cost)).trace
    if trace is None:  # the short steps do not fit the layer memo's model: all blocks
        # (a MemoJob is a rank without a pipeline memo job: open_memo)
        trace = await _full(pool, task, None, cost)
        trace.layer_memo = "fallback"
    else:
        _memo_status(trace, job.shape, task, cost)
    return cost.account(trace)


# --- stage sharing: middle pipeline ranks rebuilt from one of them ---------------------------------

@dataclass(frozen=True)
class SharedJob:
    """A middle pipeline rank rebuilt from another's units (mode/stage_share.py); picklable, so
    an actor builds it."""
    task: RankTask
    source: RankTask
    units: PipelineModel

    def build(self, runs: list[StepStreams]) -> BuildResult:
        """The rank's trace, or none where the units lack one its order needs."""
        t0 = time.perf_counter()
        try:
            streams = rebuild(self.units, self.source, self.task)
        except FitError:
            return BuildResult(None, None, time.perf_counter() - t0)
        trace = RankTrace(rank=self.task.rank, wall_s=0.0, **summarize(streams))
        return BuildResult(trace, None, time.perf_counter() - t0)


def share_sources(tasks: list[RankTask], jobs: list[Any]) -> list[int | None]:
    """For each task, the index of the task it is rebuilt from (None: it is simulated itself).
    Within each group of middle ranks that can share (stage_share.share_key), sources are
    chosen until every rank's units are some source's (stage_share.unit_keys_of): the ranks
    with the most keys first, of those the ones with the fewest executions to do (a stored
    model first), then the first; each other rank takes the first source that holds its keys."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        key = share_key(t) if t.stage_sharing else None
        if key is not None:
            groups.setdefault(key, []).append(i)
    out: list[int | None] = [None] * len(tasks)
    for members in groups.values():
        if len(members) < 2:
            continue
        keys = {i: unit_keys_of(tasks[i]) for i in members}
        sources: list[int] = []
        for i in sorted(members, key=lambda i: (-len(keys[i]), executions(jobs[i]), i)):
            source = next((s for s in sources if keys[i] <= keys[s]), None)
            if source is None:
                sources.append(i)
            out[i] = source
    return out


def planned_executions(tasks: list[RankTask], jobs: list[Any],
                       sources: list[int | None] | None = None) -> int:
    """Executions the classes need, the ranks rebuilt from another not counted (`sources`:
    share_sources(tasks, jobs), where the caller has it)."""
    if sources is None:
        sources = share_sources(tasks, jobs)
    return sum(executions(j) for j, s in zip(jobs, sources) if s is None)


async def simulate_classes(pool: Pool, tasks: list[RankTask], jobs: list[Any],
                           done: Any = None, sources: list[int | None] | None = None
                           ) -> list[RankTrace]:
    """Every class (`jobs`: their memo jobs), side by side: each through the memo protocol,
    except the middle pipeline ranks another one's units rebuild (`sources`: share_sources,
    computed here where the caller has not; one that needs a unit its source lacks is
    simulated itself). `done()` after each class."""
    if sources is None:
        sources = share_sources(tasks, jobs)
    loop = asyncio.get_running_loop()
    units: dict[int, asyncio.Future] = {s: loop.create_future() for s in sources
                                        if s is not None}

    async def one(i: int) -> RankTrace:
        task, job, source = tasks[i], jobs[i], sources[i]
        trace = None
        # (shielded: one rank's cancellation must not cancel what the others wait for)
        if source is not None and (model := await asyncio.shield(units[source])) is not None:
            trace = await _shared(pool, task, tasks[source], model)
        if trace is None:
            cost = _Cost(share=i in units)
            try:
                trace = await _simulate(pool, task, job, cost)
            except BaseException as e:
                if i in units and not units[i].done():
                    units[i].set_exception(e)
                raise
            if i in units:
                units[i].set_result(cost.shared)
        if done is not None:
            done()
        return trace

    return list(await asyncio.gather(*(one(i) for i in range(len(tasks)))))


async def _shared(pool: Pool, task: RankTask, source: RankTask,
                  units: PipelineModel) -> RankTrace | None:
    result = await pool.build(SharedJob(task, source, units), [])
    trace = result.trace
    if trace is None:
        return None
    trace.layer_memo = trace.pipeline_memo = "shared"
    trace.blocks_total = rank_blocks(task)
    return _Cost(build_s=result.seconds).account(trace)


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
