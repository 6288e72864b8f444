"""Activation checkpointing with torch's non-reentrant checkpoint:
- `full`: every block (torch's checkpoint_wrapper);
- `layer`: every other block, fully (torchtitan's selective layer AC at its default frequency
  2: blocks 0, 2, 4, ...);
- `selective`: the attention core of every block (Korthikanti et al. 2022: recompute QK^T,
  softmax, dropout and attention over V; keep everything else);
- `op`: torchtitan's op-level policy: keep the outputs of matmuls (every other one), attention
  kernels and reductions, recompute everything else in the block.

A checkpoint keeps its inputs alive for the recomputation without passing them through autograd's
saved-tensor hooks; observers registered with `observe_checkpoint_inputs` see them, so the memory
tracker can count them as activations."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils._pytree import tree_iter
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from simdist.parallel.blocks import block_container, block_items

_observers: list[Callable[[tuple], None]] = []

aten = torch.ops.aten
# torchtitan's op-SAC save list: matmuls, attention kernels, reductions it would be wasteful to redo.
_OP_SAC_SAVE = {
    aten.mm.default,
    aten.addmm.default,  # linear layers with a bias (GPT); torchtitan's llama has none
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    aten.max.default,
}


@contextlib.contextmanager
def observe_checkpoint_inputs(observer: Callable[[tuple], None]) -> Iterator[None]:
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _notify(args: tuple) -> None:
    for observer in _observers:
        observer(args)


def _op_sac_context() -> Any:
    mm_count = 0

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        nonlocal mm_count
        is_mm = func in (aten.mm.default, aten.addmm.default)
        if is_mm and not ctx.is_recompute:
            mm_count += 1
        # Save every other matmul (torchtitan: the second of each pair is cheaper to recompute
        # than to keep), and everything in the save list.
        save = func in _OP_SAC_SAVE and not (is_mm and mm_count % 2 == 0)
        if save and not ctx.is_recompute:
            # SAC keeps what it saves in its own store, not through saved-tensor hooks.
            _notify(tuple(tree_iter(getattr(ctx, "op_output", ()))))
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _wrap_block(block: nn.Module, **kwargs: Any) -> nn.Module:
    wrapped = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
    wrapped.register_forward_pre_hook(lambda _m, args: _notify(args))
    return wrapped


def _checkpointed_method(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        _notify(args)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)

    return run


def apply_ac(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    container = block_container(model)
    for name, block in block_items(model):
        if mode == "full" or (mode == "layer" and int(name) % 2 == 0):
            container[name] = _wrap_block(block)
        elif mode == "layer":
            continue
        elif mode == "op":
            container[name] = _wrap_block(block, context_fn=_op_sac_context)
        elif mode == "selective":
            cores = [m for m in block.modules() if hasattr(m, "core_attention")]
            if not cores:
                raise ValueError(f"{type(block).__name__} has no core_attention to recompute")
            for m in cores:
                m.core_attention = _checkpointed_method(m.core_attention)
        else:
            raise ValueError(f"activation_checkpointing={mode!r}")


_GATHERS = {
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.wait_tensor.default,
}


def _regather_context() -> Any:
    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.PREFER_RECOMPUTE if func in _GATHERS else CheckpointPolicy.MUST_SAVE

    return create_selective_checkpoint_contexts(policy)


def regather_in_backward(module: nn.Module) -> nn.Module:
    """Megatron's sequence parallelism (Korthikanti et al. 2022, section 4.2.3): a column-parallel
    linear that all-gathers its sequence-sharded input keeps only the local shard for backward
    and all-gathers it again there. torch's ColwiseParallel keeps the gathered input; selective
    checkpointing of the linear with everything saved except the all-gather gives Megatron's
    behaviour from torch's own mechanisms (the matmul is not recomputed)."""
    return _wrap_block(module, context_fn=_regather_context)
