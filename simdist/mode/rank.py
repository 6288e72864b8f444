"""Simulate one rank: build the model on meta, parallelise it with torch.distributed, materialise
it as fake tensors, run one recorded training step."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from simdist.config import torch_dtype
from simdist.models import build_model
from simdist.mode.context import StepContext
from simdist.mode.session import rank_session
from simdist.cache.layers import LayerStore
from simdist.mode.layer_memo import (BASE_LAYERS, MemoPlan, StreamModel, fit_stream_model,
                                     memo_plan, rank_blocks)
from simdist.mode.streams import StepStreams, summarize
from simdist.mode.step import init_optimizer_state, make_optimizer, run_step
from simdist.mode.trace import RankTask, RankTrace
from simdist.mode.pipeline import run_pipeline_step
from simdist.parallel import ParallelPlan, build_device_mesh, mesh_group_dims, parallelize
from simdist.parallel.context_parallel import context_parallel
from simdist.parallel.data_parallel import grad_sync_rule
from simdist.parallel.zero import ZeroOptimizer
from simdist.parallel.pipeline import stage_parts, stages_per_rank

if TYPE_CHECKING:
    from simdist.cache.warm import RankCache


def _cache_counts() -> dict[str, int]:
    info = FakeTensorMode.cache_info()
    return {"hits": info.hits, "misses": info.misses, "bypasses": sum(info.bypasses.values()),
            "size": info.size}


def simulate_rank(task: RankTask, cache: RankCache | None = None) -> RankTrace:
    """One rank's step, start to end in this process: through the layer memo where it applies
    (its short steps executed one after another), else executed in full. The coordinator runs
    the same pieces (`open_memo`, `execute_unit`, `MemoJob.build`) spread over its actors."""
    job = open_memo(task)
    if job is None:
        return execute_unit(task, cache)
    units = [execute_unit(t, cache, keep_streams=True) for t in job.short_tasks()]
    trace, parts, build_s = job.build([u.streams for u in units])
    store_memo(job, parts)
    if trace is None:  # the short steps do not fit the memo's model
        units.append(execute_unit(task, cache))
    return job.account(trace, units, build_s)


def execute_unit(task: RankTask, cache: RankCache | None = None,
                 keep_streams: bool = False) -> RankTrace:
    """Execute `task` as it is (never through the memo), with its dispatch-cache counters.
    `cache` (simdist.cache.warm.RankCache): the shared dispatch cache of this process, warmed
    before and collected after (`cache.last_delta`). `keep_streams`: the trace keeps its event
    streams (the memo's short steps; they are fitted elsewhere)."""
    t0 = time.perf_counter()
    # --- shared dispatch cache (simdist/cache): warm FakeTensorMode's cache from the store ---
    if cache is not None:
        cache.before_rank()
    # --- end shared dispatch cache ---
    cache0 = _cache_counts()
    trace = execute_rank(task)
    cache1 = _cache_counts()
    # --- shared dispatch cache (simdist/cache): collect this rank's new entries (cache.last_delta)
    if cache is not None:
        cache.after_rank()
    # --- end shared dispatch cache ---
    trace.wall_s = time.perf_counter() - t0
    trace.fake_cache = {k: cache1[k] - cache0[k] for k in ("hits", "misses", "bypasses")}
    trace.fake_cache["size"] = cache1["size"]
    trace.blocks_executed = trace.blocks_total = rank_blocks(task)
    if not keep_streams:
        trace.streams = None
    return trace


# --- the layer memo around execution (mode/layer_memo.py; its models in cache/layers.py) --------

@dataclass(frozen=True)
class MemoJob:
    """One rank through the layer memo. `stored`: its model as the layer store holds it (None:
    not stored yet; {"fallback": True}: known not to fit). Picklable: the coordinator opens the
    job where the store is (the driver) and has an actor `build` it."""
    task: RankTask
    plan: MemoPlan
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
        return [replace(self.plan.reduced(self.task, BASE_LAYERS + i), layer_memo=False)
                for i in range(3)]

    def build(self, runs: list[StepStreams]) -> tuple[RankTrace | None, dict | None, float]:
        """(the rank's trace, parts for the store, seconds this took): rebuilt from the stored
        model (no `runs`) or fitted to the executed short steps; the trace is None where they do
        not fit (or the store says so: execute in full); parts are None when nothing is new to
        store."""
        t0 = time.perf_counter()
        trace, parts = self._build(runs)
        return trace, parts, time.perf_counter() - t0

    def _build(self, runs: list[StepStreams]) -> tuple[RankTrace | None, dict | None]:
        if self.fallback:
            return None, None
        if self.stored is not None:
            model, parts = StreamModel.from_parts(self.stored), None
        else:
            model = fit_stream_model(runs)
            if model is None:
                return None, {"fallback": True}
            parts = model.to_parts()
        fields = summarize(model.streams(self.plan))
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
            trace.blocks_total = self.plan.layers_per_stage * len(self.plan.stages)
        trace.blocks_executed = sum(u.blocks_executed for u in units)
        trace.wall_s = sum(u.wall_s for u in units) + build_s
        trace.fake_cache = {k: sum(u.fake_cache.get(k, 0) for u in units)
                            for k in ("hits", "misses", "bypasses")}
        trace.fake_cache["size"] = max((u.fake_cache.get("size", 0) for u in units), default=0)
        trace.streams = None
        return trace


def open_memo(task: RankTask) -> MemoJob | None:
    """The memo job for `task`, its model looked up in the layer store; None where the memo is
    off or does not apply (execute in full)."""
    plan = memo_plan(task) if task.layer_memo else None
    if plan is None:
        return None
    store = _store(task)
    if store is None:
        return MemoJob(task, plan, "", None)
    key = store.key(replace(plan.reduced(task, BASE_LAYERS), layer_cache_dir=None))
    return MemoJob(task, plan, key, store.get(key))


def store_memo(job: MemoJob, parts: dict | None) -> None:
    """Keep a newly fitted model (or the fact that the rank does not fit) for later runs."""
    store = _store(job.task)
    if parts is not None and store is not None:
        store.put(job.key, parts)


def _store(task: RankTask) -> LayerStore | None:
    return (LayerStore.open(task.layer_cache_dir, torch.__version__)
            if task.layer_cache_dir else None)


def execute_rank(task: RankTask) -> RankTrace:
    """Execute one rank's step in full; the trace keeps its event streams."""
    t0 = time.perf_counter()
    ctx = StepContext(track_modules=not (task.layout.degree("pp") > 1
                                         and task.pp_schedule == "zero_bubble"))
    with rank_session(task.rank, task.layout.world_size, ctx):
        mesh = build_device_mesh(task.layout)
        plan = ParallelPlan(task.layout, torch_dtype(task.dtype), task.activation_checkpointing,
                            task.sequence_parallel, task.zero_stage)
        pp = task.layout.degree("pp")
        parts = stage_parts(partial(build_model, task.model, "meta"), task.model.n_layers or 0,
                            pp, task.layout.coords(task.rank)["pp"], task.pp_schedule,
                            task.pp_virtual_stages, task.pp_layers)
        for _, part in parts:
            parallelize(task.model.family, part, mesh, plan)
        model = nn.ModuleList([part for _, part in parts])
        tied = _tied_parameters(model)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model.to_empty(device="cpu")
        _retie(model, tied)
        fake_mode.allow_non_fake_inputs = False
        with fake_mode, ctx.exclude():
            if task.zero_stage in (1, 2):
                optimizer = ZeroOptimizer([p for p in model.parameters() if p.requires_grad],
                                          mesh["dp_shard"].get_group(), task.zero_stage)
            else:
                optimizer = make_optimizer(model, task.optimizer)
            init_optimizer_state(model, optimizer)
        common = dict(group_dims=mesh_group_dims(mesh), vocab_size=_vocab(task),
                      batch=task.micro_batch, seq_len=task.seq_len,
                      num_microbatches=task.num_microbatches)
        if pp > 1:
            fields = run_pipeline_step(
                parts, optimizer, fake_mode, ctx, pp_group=mesh["pp"].get_group(),
                num_stages=pp * stages_per_rank(task.pp_schedule, task.pp_virtual_stages),
                schedule_name=task.pp_schedule, dtype=plan.param_dtype,
                seq_shards=task.layout.degree("tp") if task.sequence_parallel else 1, **common)
        else:
            cp = task.layout.degree("cp")
            if cp > 1:  # this rank's tokens: seq / cp, attention as ring attention
                common["seq_len"] = task.seq_len // cp
            fields = run_step(parts[0][1], optimizer, fake_mode, ctx,
                              all_microbatches=task.all_microbatches,
                              loss_parallel=plan.loss_parallel,
                              grad_sync=grad_sync_rule(task.grad_sync,
                                                       task.layout.degree("dp_replicate"),
                                                       task.layout.degree("dp_shard"),
                                                       task.zero_stage),
                              step_context=(partial(context_parallel, mesh["cp"]) if cp > 1
                                            else contextlib.nullcontext), **common)
    fields["wall_s"] = time.perf_counter() - t0
    return RankTrace(rank=task.rank, **fields)


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """`to_empty` from meta makes a new Parameter per module, which unties shared weights
    (GPT's embedding and head) unless a wrapper (FSDP) owns them: tie them again."""
    for names in tied:
        source = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if module._parameters.get(attr) is not source:
                module._parameters[attr] = source


def _vocab(task: RankTask) -> int:
    args = task.model.args
    return getattr(args, "vocab_size", None) or task.model.kwargs.get("vocab_size", 32000)
