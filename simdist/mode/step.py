"""One training step of one rank on fake tensors, recorded.

Micro-batches: the first creates the gradients, the middle ones accumulate into them, and where
gradients sync once per step (training.grad_sync, simdist.parallel.data_parallel.GradSync) the
last one runs the reductions the others held back. The middle ones repeat each other exactly
(same shapes, same live state, same collectives), so by default one of them is executed, with
weight n-2, between the first and the last; where every micro-batch reduces alike, the first
and the second with weight n-1. `all_microbatches` executes them all, which the tests use to
prove the two give the same rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_iter
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx

from simdist.mode.collectives import CollectiveRecorder
from simdist.mode.kernels import KernelStream, fsdp_streams
from simdist.mode.context import StepContext
from simdist.mode.cuda import cuda_semantics
from simdist.mode.memory import MemoryTracker, local_tensor
from simdist.mode.ops import OpCounter
from simdist.mode.streams import summarize
from simdist.trace import StepStreams
from simdist.parallel.checkpointing import observe_checkpoint_inputs
from simdist.parallel.data_parallel import PER_MICROBATCH, GradSync


def _storage_bytes(tensors) -> int:  # noqa: ANN001
    seen: dict[int, int] = {}
    for t in tensors:
        st = local_tensor(t).untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    if hasattr(optimizer, "state_tensors"):  # sharded optimizers (ZeRO-1/2) keep their own
        return optimizer.state_tensors()
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def gradient_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if hasattr(optimizer, "gradient_tensors"):  # ZeRO-2 keeps gradient shards, not .grad
        return optimizer.gradient_tensors()
    return [p.grad for p in params if p.grad is not None]


def loss_fn(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # torchtitan computes the loss in fp32; GPT's logits are [seq, batch, vocab].
    if getattr(model, "seq_first_output", False):
        labels = labels.t()
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Steady state: the optimizer state exists before the step (it is created lazily at the
    first `step()`, which a real job runs once, long before the step we measure)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def recording(ctx: StepContext, group_dims: dict[str, str], memory_only: bool = False):  # noqa: ANN201
    """The recorders of a step, entered; `memory_only`: the storage timeline alone (a symbolic
    run, mode/symbolic.py: the op and collective recorders turn sizes into Python ints, which
    would specialise a symbolic size to its hint); the others are then None."""
    mem = MemoryTracker(ctx)
    if memory_only:
        colls = ops = None
    else:
        colls = CollectiveRecorder(ctx, group_dims)
        ops = OpCounter(ctx)
        ctx.kernels = KernelStream(ctx, mem)  # notified by the op and collective recorders

    def checkpoint_inputs(args: tuple) -> None:
        for t in tree_iter(args):
            if isinstance(t, torch.Tensor):
                mem.mark_saved(t)

    try:
        # CUDA's kernels for F.scaled_dot_product_attention, F.rms_norm, F.dropout and LayerNorm's
        # statistics (mode/cuda.py), entered first: the recorders see the ops a GPU runs.
        with cuda_semantics(ctx), ctx.mod_tracker, colls or contextlib.nullcontext(), \
                ops or contextlib.nullcontext(), mem, \
                observe_checkpoint_inputs(checkpoint_inputs), fsdp_streams(ctx):
            yield colls, ops, mem, ctx.kernels
    finally:
        ctx.kernels = None


def record_step(
    resident: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    fake_mode: FakeTensorMode,
    ctx: StepContext,
    group_dims: dict[str, str],
    run_microbatches: Callable[[MemoryTracker], int],
    memory_only: bool = False,
) -> dict:
    """Record one step: `run_microbatches` runs every forward and backward of the step (and
    returns how many micro-batches it executed); then the optimizer step. Returns the trace
    fields (see RankTrace); `memory_only`: only `streams`, with the memory stream and the
    scalars (see `recording`)."""
    t0 = time.perf_counter()
    # The parameters the optimizer updates (FSDP's sharded ones): a module's `parameters()` may
    # list unsharded views while FSDP holds them gathered.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    streams = StepStreams()
    with fake_mode, recording(ctx, group_dims, memory_only) as (colls, ops, mem, kernels):
        mem.track_existing(params, "param")
        mem.track_existing(optimizer_state_tensors(optimizer), "optimizer")
        if hasattr(optimizer, "resident_gradient_tensors"):  # Megatron's main_grad (ZeRO-1)
            mem.track_existing(optimizer.resident_gradient_tensors(), "grad")
        mem.track_existing(resident, "buffer")
        initial_live, initial_saved = mem.start()
        executed = run_microbatches(mem)
        with ctx.in_phase("optim"):
            param_bytes = _storage_bytes(params)
            grads = gradient_tensors(optimizer, params)
            grad_bytes = _storage_bytes(grads)
            del grads
            optimizer.step()
            optimizer_bytes = _storage_bytes(optimizer_state_tensors(optimizer))
            optimizer.zero_grad(set_to_none=True)
    streams.memory = mem.close()
    streams.scalars = dict(initial_live=initial_live, initial_saved=initial_saved,
                           param_bytes=param_bytes, grad_bytes=grad_bytes,
                           optimizer_bytes=optimizer_bytes, executed_microbatches=executed)
    if memory_only:
        return dict(streams=streams, wall_s=time.perf_counter() - t0)
    streams.ops, streams.collectives = ops.events, colls.events
    streams.kernels, streams.boundaries = kernels.events, kernels.boundaries
    fields = summarize(streams)
    fields["wall_s"] = time.perf_counter() - t0
    fields["streams"] = streams
    return fields


def microbatch_weights(n: int, all_microbatches: bool, last_differs: bool) -> list[int]:
    """The weight of each executed micro-batch (they sum to n): all n, or first, one middle
    standing for the n-2 identical ones and last; where the last is like the middle ones, first
    and one standing for n-1."""
    if all_microbatches or n <= 2:
        return [1] * n
    return [1, n - 2, 1] if last_differs else [1, n - 1]


def microbatch_span(n: int, all_microbatches: bool, last_differs: bool) -> tuple[int, int | None]:
    """The micro-batch counts per step (lowest, highest; None: unbounded) whose step executes
    the same micro-batches as `n`'s (microbatch_weights: the same list up to the weights). Their
    memory streams are the same: a weight scales an op's FLOPs, never an allocation."""
    if all_microbatches or n == 1:
        return n, n
    if last_differs:
        return (2, 2) if n == 2 else (3, None)
    return 2, None


def run_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fake_mode: FakeTensorMode,
    ctx: StepContext,
    *,
    group_dims: dict[str, str],
    vocab_size: int,
    batch: int,
    seq_len: int,
    num_microbatches: int,
    all_microbatches: bool,
    loss_parallel: bool = False,
    step_context: Callable[[], Any] = contextlib.nullcontext,
    grad_sync: GradSync = PER_MICROBATCH,
    memory_only: bool = False,
    forward_inputs: Callable[..., dict[str, Any]] | None = None,
) -> dict:
    """One step without pipelining: a gradient-accumulation loop, with FSDP2's gradient sync
    set before each micro-batch as `grad_sync` says. `step_context` wraps the forwards and
    backwards (context parallelism; then `seq_len` is the local length). `memory_only`: see
    record_step. `forward_inputs(model, batch, seq_len)`: the forward's keyword arguments
    besides the tokens (an entrypoint's `model.inputs`), made per micro-batch as a trainer's
    data preparation, outside the record."""
    weights = microbatch_weights(num_microbatches, all_microbatches, grad_sync.last_differs)
    executed = len(weights)

    def microbatches(mem: MemoryTracker) -> int:
        with step_context():
            return _accumulate(mem)

    def _accumulate(mem: MemoryTracker) -> int:
        for i, weight in enumerate(weights):
            grad_sync.before_microbatch(model, last=i == executed - 1)
            if hasattr(optimizer, "before_microbatch"):  # ZeRO-1/2 (parallel/zero.py)
                optimizer.before_microbatch(last=i == executed - 1)
            # Vocab-sharded logits (tensor parallel): cross-entropy and its backward run on the
            # shards, as torchtitan does with `loss_parallel`.
            lp = loss_parallel_ctx() if loss_parallel else contextlib.nullcontext()
            with lp:
                with ctx.in_phase("fwd", weight), mem.saved_tensors_hooks():
                    tokens = torch.randint(0, vocab_size, (batch, seq_len))
                    labels = torch.randint(0, vocab_size, (batch, seq_len))
                    with ctx.exclude():
                        extra = forward_inputs(model, batch, seq_len) if forward_inputs else {}
                    loss = loss_fn(model, model(tokens, **extra), labels)
                with ctx.in_phase("bwd", weight):
                    loss.backward()
            del loss, tokens, labels, extra
        return executed

    return record_step(list(model.buffers()), optimizer, fake_mode, ctx, group_dims, microbatches,
                       memory_only)
