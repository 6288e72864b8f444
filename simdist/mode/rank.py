"""Simulate one rank: build the model on meta, parallelise it with torch.distributed, materialise
it as fake tensors, run one recorded training step. The layer memo (simdist/memo.py) and the
shared dispatch cache (a hook entered around the rank) wrap this from outside."""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from simdist.config import torch_dtype
from simdist.families import build_model, forward_inputs
from simdist.mode.context import StepContext
from simdist.mode.layer_memo import rank_blocks
from simdist.mode.pipeline import run_pipeline_step
from simdist.mode.session import rank_session
from simdist.mode.step import init_optimizer_state, make_optimizer, run_step
from simdist.parallel import ParallelPlan, build_device_mesh, mesh_group_dims
from simdist.parallel.context_parallel import context_parallel
from simdist.parallel.data_parallel import grad_sync_rule
from simdist.parallel.pipeline import stage_parts
from simdist.parallel.zero import ZeroOptimizer
from simdist.trace import RankTask, RankTrace


def _cache_counts() -> dict[str, int]:
    info = FakeTensorMode.cache_info()
    return {"hits": info.hits, "misses": info.misses, "bypasses": sum(info.bypasses.values()),
            "size": info.size}


def execute_unit(task: RankTask, around_rank: AbstractContextManager | None = None,
                 keep_streams: bool = False) -> RankTrace:
    """Execute `task` as it is (never through the memo), with FakeTensorMode's dispatch-cache
    counters. `around_rank` is entered around the execution (the shared dispatch cache warms
    FakeTensorMode's cache before and collects the new entries after). `keep_streams`: the
    trace keeps its event streams (the memo's short steps; a build fits them)."""
    t0 = time.perf_counter()
    with around_rank if around_rank is not None else contextlib.nullcontext():
        cache0 = _cache_counts()
        trace = execute_rank(task)
        cache1 = _cache_counts()
    trace.wall_s = time.perf_counter() - t0
    trace.fake_cache = {k: cache1[k] - cache0[k] for k in ("hits", "misses", "bypasses")}
    trace.fake_cache["size"] = cache1["size"]
    trace.blocks_executed = trace.blocks_total = rank_blocks(task)
    if not keep_streams:
        trace.streams = None
    return trace


def execute_rank(task: RankTask) -> RankTrace:
    """Execute one rank's step in full; the trace keeps its event streams."""
    return RankTrace(rank=task.rank, **run_rank_step(task))


@dataclass(frozen=True)
class StepInputs:
    """How a step is executed where it is not the task's own (mode/symbolic.py): under a
    FakeTensorMode with this ShapeEnv, with these micro-batch and sequence sizes (SymInts there),
    recording only the memory stream."""
    shape_env: Any = None
    batch: Any = None  # None: task.training.micro_batch
    seq_len: Any = None  # None: task.training.seq_len
    memory_only: bool = False


def run_rank_step(task: RankTask, inputs: StepInputs = StepInputs()) -> dict:
    """The trace fields of one rank's step, executed in full (`inputs.memory_only`: its
    `streams` alone, see mode/step.py: record_step). Its meshes are those of the earlier
    sessions of this rank and layout in this process (mode/session.py: RankSession), or its
    own where those turn out not to name the same process groups (then it runs again)."""
    t0 = time.perf_counter()
    fields = _run_rank_step(task, inputs, share_meshes=True)
    if fields is None:
        fields = _run_rank_step(task, inputs, share_meshes=False)
    fields["wall_s"] = time.perf_counter() - t0
    return fields


def _run_rank_step(task: RankTask, inputs: StepInputs, share_meshes: bool) -> dict | None:
    training, par, family = task.training, task.parallel, task.model.registration
    batch = training.micro_batch if inputs.batch is None else inputs.batch
    seq_len = training.seq_len if inputs.seq_len is None else inputs.seq_len
    ctx = StepContext(track_modules=not (par.pp > 1 and par.pp_schedule == "zero_bubble"))
    key = (task.rank, task.layout) if share_meshes else None
    with rank_session(task.rank, task.layout.world_size, ctx, key) as session:
        mesh = build_device_mesh(task.layout)
        plan = ParallelPlan(task.layout, torch_dtype(training.dtype),
                            training.activation_checkpointing, par.sequence_parallel,
                            par.zero_stage)
        parts = stage_parts(partial(build_model, task.model, "meta"), task.model.n_layers or 0,
                            par, task.layout.coords(task.rank)["pp"])
        for _, part in parts:
            family.parallelize(part, mesh, plan)
        model = nn.ModuleList([part for _, part in parts])
        tied = _tied_parameters(model)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=inputs.shape_env)
        with fake_mode:
            model.to_empty(device="cpu")
        _retie(model, tied)
        fake_mode.allow_non_fake_inputs = False
        with fake_mode, ctx.exclude():
            if par.zero_stage in (1, 2):
                optimizer = ZeroOptimizer(
                    [p for p in model.parameters() if p.requires_grad],
                    mesh["dp_shard"].get_group(), par.zero_stage, model,
                    overlap_grad_reduce=par.zero_overlap_grad_reduce,
                    overlap_param_gather=par.zero_overlap_param_gather,
                    grad_dtype=(torch.float32 if par.zero_grad_dtype == "fp32" else None))
            else:
                optimizer = make_optimizer(model, training.optimizer)
            init_optimizer_state(model, optimizer)
        common = dict(group_dims=mesh_group_dims(mesh), vocab_size=_vocab(task),
                      batch=batch, seq_len=seq_len, num_microbatches=task.num_microbatches,
                      memory_only=inputs.memory_only)
        if par.pp > 1:
            fields = run_pipeline_step(
                parts, optimizer, fake_mode, ctx, pp_group=mesh["pp"].get_group(),
                num_stages=par.stages, schedule_name=par.pp_schedule, dtype=plan.param_dtype,
                seq_shards=par.tp if par.sequence_parallel else 1, **common)
        else:
            cp = par.cp
            if cp > 1:  # this rank's tokens: seq / cp, attention as ring attention
                common["seq_len"] = seq_len // cp
            fields = run_step(parts[0][1], optimizer, fake_mode, ctx,
                              all_microbatches=task.all_microbatches,
                              loss_parallel=plan.loss_parallel,
                              grad_sync=grad_sync_rule(training.grad_sync, par.dp_replicate,
                                                       par.dp_shard, par.zero_stage,
                                                       par.zero_overlap_grad_reduce),
                              forward_inputs=forward_inputs(task.model),
                              step_context=(partial(context_parallel, mesh["cp"],
                                                    family.attention_modules) if cp > 1
                                            else contextlib.nullcontext), **common)
    return fields if session.consistent else None


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
