"""One pipeline-parallel step of one rank: this rank's stages run torch.distributed.pipelining's
real schedule (its order of micro-batch forwards and backwards), so the activations in flight
are measured, not assumed.

Two adaptations to fake execution, both about the schedule's first-step handshake:
- the p2p warm-up vote (`_PipelineSchedule._warmup_p2p`) calls `.item()` on a received tensor,
  which fake tensors cannot answer; the stage metadata is static here (we pass exact input and
  output examples), so each stage is put in STATIC inference mode instead of voting.
- examples after stage 0 and all outputs need `requires_grad=True` for backward to be built."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining.schedules import PipelineScheduleMulti
from torch.distributed.pipelining.stage import InferenceMode

from simdist.mode.context import StepContext
from simdist.mode.memory import MemoryTracker
from simdist.mode.step import loss_fn, record_step
from simdist.parallel.pipeline import SCHEDULES


def _static_warmup(self: Any, stages: list, has_backward: bool, p2p_done: bool) -> None:
    for stage in stages:
        stage._inference_mode = InferenceMode.STATIC


def _phase_wrapped(ctx: StepContext, fn: Any, phase: str) -> Any:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with ctx.in_phase(phase):
            return fn(*args, **kwargs)

    return run


def _action_wrapped(ctx: StepContext, fn: Any, phase: str, action: str, stage: int) -> Any:
    """A schedule action (F, B, I = input gradient only, W = weight gradient) of one
    micro-batch on one stage, marked at its begin and end in the kernel stream: the pipeline's
    cross-stage simulation replays the schedule from these (costmodel/step_sim.py)."""
    @functools.wraps(fn)
    def run(chunk: int, *args: Any, **kwargs: Any) -> Any:
        kind = action
        if action == "B" and kwargs.get("full_backward", True) is False:
            kind = "I"
        with ctx.in_phase(phase):
            if ctx.kernels is not None:
                ctx.kernels.mark(f"begin {kind} {stage} {chunk}")
            out = fn(chunk, *args, **kwargs)
            if ctx.kernels is not None:
                ctx.kernels.mark(f"end {kind} {stage} {chunk}")
            return out

    return run


@contextlib.contextmanager
def _action_boundaries(ctx: StepContext) -> Iterator[None]:
    """The runtime schedules (interleaved, zero bubble) run each action of their lowered order
    (compute, send, receive, FSDP unshard / reshard, gradient reduction) under
    `record_function("PP:<action>")`: while the step runs, that profiler range records the
    action's enter and exit among the kernel stream's boundaries instead (the pipeline memo cuts
    the streams there; nothing is added to the streams)."""
    original = torch_schedules.record_function

    @contextlib.contextmanager
    def record(name: str) -> Iterator[None]:
        kernels = ctx.kernels
        if kernels is not None:
            kernels.boundary(f"enter {name}")
        yield
        if kernels is not None:
            kernels.boundary(f"exit {name}")

    torch_schedules.record_function = record
    try:
        yield
    finally:
        torch_schedules.record_function = original


class _WaitFor:
    """An FSDP unshard handle whose wait (the copy-out of the gathered parameters) is recorded
    for the module the unshard is for."""

    def __init__(self, handle: Any, ctx: StepContext, fqn: str) -> None:
        self._handle, self._ctx, self._fqn = handle, ctx, fqn

    def wait(self) -> None:
        with self._ctx.for_module(self._fqn):
            self._handle.wait()


@contextlib.contextmanager
def _unshards_by_module(ctx: StepContext, parts: list[tuple[int, nn.Module]]) -> Iterator[None]:
    """The runtime schedules' UNSHARD action calls `unshard(async_op=True)` on every FSDP module
    of a stage, outside any module's forward, and waits on the handles before the stage's first
    compute: without a running module those all-gathers and copy-outs would be the root's,
    although each is one block's. While the step runs, each is recorded for the module it
    gathers (its FQN in the model, as the module tracker names modules), so a block's
    unshard is part of that block's events (the layer memo inserts them with the block)."""
    names = {id(m): name.replace("._checkpoint_wrapped_module", "")
             for _, module in parts for name, m in module.named_modules()}
    original = FSDPModule.unshard

    def unshard(self: FSDPModule, async_op: bool = False) -> Any:
        fqn = names.get(id(self), "")
        if not fqn or ctx.module():  # the root's own, or inside a module: as recorded
            return original(self, async_op=async_op)
        with ctx.for_module(fqn):
            handle = original(self, async_op=async_op)
        return _WaitFor(handle, ctx, fqn) if handle is not None else None

    FSDPModule.unshard = unshard
    try:
        yield
    finally:
        FSDPModule.unshard = original


def build_stages(parts: list[tuple[int, nn.Module]], num_stages: int, group: Any,
                 batch: int, seq_len: int, fake_mode: FakeTensorMode, ctx: StepContext,
                 dtype: torch.dtype, seq_shards: int = 1) -> list[PipelineStage]:
    """PipelineStage per (stage_id, module), with example inputs/outputs from a shape run.
    Under sequence parallelism the activations between stages are the local sequence shards
    (`seq_shards` = tp)."""
    stages = []
    for stage_id, module in parts:
        with fake_mode, ctx.exclude(), torch.no_grad():
            if stage_id == 0:
                example = torch.zeros(batch, seq_len, dtype=torch.long)
            else:
                dim = _hidden_dim(module)
                example = _stage_input(module, batch, seq_len // seq_shards, dim, dtype)
            out = module(example)
            out = out.full_tensor() if hasattr(out, "full_tensor") else out
            out_example = torch.empty_like(out).requires_grad_(True)
            if stage_id != 0:
                example = example.detach().requires_grad_(True)
        # The shape run left FSDP's parameters gathered; a real step starts resharded.
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        stage = PipelineStage(module, stage_id, num_stages, torch.device("cpu"),
                              input_args=(example,), output_args=(out_example,), group=group)
        stage.forward_one_chunk = _action_wrapped(ctx, stage.forward_one_chunk, "fwd", "F",
                                                  stage_id)
        stage.backward_one_chunk = _action_wrapped(ctx, stage.backward_one_chunk, "bwd", "B",
                                                   stage_id)
        stage.backward_weight_one_chunk = _action_wrapped(
            ctx, stage.backward_weight_one_chunk, "bwd", "W", stage_id)
        stages.append(stage)
    return stages


def _hidden_dim(module: nn.Module) -> int:
    return module.args.dim


def _stage_input(module: nn.Module, batch: int, seq_len: int, dim: int,
                 dtype: torch.dtype) -> torch.Tensor:
    # Activations between stages: [b, s, h] (llama3) or Megatron's [s, b, h] (GPT).
    if getattr(module, "seq_first_output", False):
        return torch.zeros(seq_len, batch, dim, dtype=dtype)
    return torch.zeros(batch, seq_len, dim, dtype=dtype)


def run_pipeline_step(
    parts: list[tuple[int, nn.Module]],
    optimizer: torch.optim.Optimizer,
    fake_mode: FakeTensorMode,
    ctx: StepContext,
    *,
    group_dims: dict[str, str],
    pp_group: Any,
    num_stages: int,
    schedule_name: str,
    vocab_size: int,
    batch: int,
    seq_len: int,
    num_microbatches: int,
    dtype: torch.dtype,
    seq_shards: int = 1,
    memory_only: bool = False,
) -> dict:
    stages = build_stages(parts, num_stages, pp_group, batch, seq_len, fake_mode, ctx, dtype,
                          seq_shards)
    model0 = parts[-1][1]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(model0, logits, labels)

    cls = SCHEDULES[schedule_name]
    schedule = cls(stages if issubclass(cls, PipelineScheduleMulti) else stages[0], num_microbatches,
                   loss_fn=loss)
    schedule._warmup_p2p = functools.partial(_static_warmup, schedule)
    # The loss belongs to the forward; everything the schedule does outside the stage chunks
    # (gradient scaling, FSDP's post-backward reductions) to the backward.
    schedule._compute_loss = _phase_wrapped(ctx, schedule._compute_loss, "fwd")
    first = any(sid == 0 for sid, _ in parts)
    last = any(sid == num_stages - 1 for sid, _ in parts)
    buffers = [b for _, m in parts for b in m.buffers()]

    def microbatches(mem: MemoryTracker) -> int:
        with ctx.in_phase("fwd"):
            args = (torch.randint(0, vocab_size, (batch * num_microbatches, seq_len)),) if first else ()
            # chunked on dim 0 by the schedule; loss_fn handles GPT's seq-first logits
            kwargs = {"target": torch.randint(0, vocab_size, (batch * num_microbatches, seq_len))} if last else {}
        with (ctx.in_phase("bwd"), mem.saved_tensors_hooks(), _action_boundaries(ctx),
              _unshards_by_module(ctx, parts)):
            schedule.step(*args, return_outputs=False, **kwargs)
        return num_microbatches

    return record_step(buffers, optimizer, fake_mode, ctx, group_dims, microbatches, memory_only)
