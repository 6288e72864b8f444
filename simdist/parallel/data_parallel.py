"""Data parallelism through torch's own FSDP2 machinery: `fully_shard` (FSDP / ZeRO-3, and HSDP
on a 2-D replicate x shard mesh) and `replicate` (DDP built on FSDP2's param groups)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from simdist.parallel.blocks import block_items


def mixed_precision(param_dtype: torch.dtype) -> MixedPrecisionPolicy:
    # bf16 compute copies, fp32 gradient reduction: torchtitan's default policy.
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype,
               reshard_after_forward: bool = True, expert_mesh: DeviceMesh | None = None) -> None:
    """One FSDP unit per transformer block, the rest (embeddings, norm, head) in the root unit.
    `dp_mesh` is 1-D (FSDP) or 2-D (dp_replicate, dp_shard) for HSDP. With pipelining,
    torchtitan keeps blocks unsharded between forward and backward (every micro-batch would
    re-gather them otherwise): `reshard_after_forward=False`."""
    mp = mixed_precision(param_dtype)
    blocks = [block for _, block in block_items(model)]
    for i, block in enumerate(blocks):
        if expert_mesh is not None:
            # expert-parallel experts: their own unit over the ranks holding the same experts
            for m in block.modules():
                if getattr(m, "expert_parallel", None) is not None:
                    fully_shard(m.experts, mesh=expert_mesh, mp_policy=mp,
                                reshard_after_forward=reshard_after_forward)
        # The last block's parameters are needed again at once by backward: keep them, as
        # torchtitan does.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """Replicated parameters, gradients all-reduced per block (DDP buckets = FSDP2 groups)."""
    mp = mixed_precision(param_dtype)
    for _, block in block_items(model):
        replicate(block, mesh=dp_mesh, mp_policy=mp)
    replicate(model, mesh=dp_mesh, mp_policy=mp)


# --- gradient synchronisation over the micro-batches of a step -------------------------------

@dataclass(frozen=True)
class GradSync:
    """Which gradient reductions FSDP2 runs after a micro-batch that is not the step's last (the
    last one runs them all). `reduce`: FSDP2's `requires_gradient_sync` (FSDP's reduce-scatter,
    DDP's all-reduce, HSDP's both: off = `no_sync`, unsharded gradients accumulate in the reduce
    dtype); `all_reduce`: `requires_all_reduce` (HSDP's replicate all-reduce: off = the
    reduce-scattered shards accumulate)."""

    reduce: bool = True
    all_reduce: bool = True

    @property
    def last_differs(self) -> bool:
        """The last micro-batch runs reductions the others do not."""
        return not (self.reduce and self.all_reduce)

    def before_microbatch(self, model: nn.Module, last: bool) -> None:
        """Set FSDP2's flags on every unit of `model` for the micro-batch about to run. Nothing
        to do where the rule never turns a reduction off (and none to turn off: ZeRO-1/2)."""
        if not self.last_differs or not isinstance(model, FSDPModule):
            return
        model.set_requires_gradient_sync(self.reduce or last)  # sets all_reduce too
        if self.reduce:
            model.set_requires_all_reduce(self.all_reduce or last)


PER_STEP, PER_MICROBATCH = GradSync(False, False), GradSync(True, True)


def grad_sync_rule(grad_sync: str, dp_replicate: int, dp_shard: int, zero_stage: int,
                   zero_overlap_grad_reduce: bool = False) -> GradSync:
    """`training.grad_sync` for a plan without pipelining (torch.distributed.pipelining syncs
    once per step itself: `PipelineStage.backward_maybe_with_nosync` turns FSDP2's gradient sync
    off for every backward and `perform_reduce_grad` reduces after the last). `auto` does what
    real code does:
    - DDP: once per step (torch DDP's `no_sync`, Megatron's overlapped grad reduce);
    - FSDP: every micro-batch, as torchtitan's `Trainer.train_step` does (a plain
      `loss.backward()` per micro-batch, no `set_requires_gradient_sync`);
    - HSDP: the shard reduce-scatter every micro-batch as FSDP, the replicate all-reduce once
      per step (`set_requires_all_reduce(False)` until the last micro-batch);
    - ZeRO-1/2 (simdist.parallel.zero, not FSDP2): their own rule (ZeRO-1 at the optimizer
      step, ZeRO-2 every micro-batch); the config allows only that. ZeRO-1 with
      `zero_overlap_grad_reduce` reduces during the last micro-batch's backward, which then
      differs from the others (the optimizer's own hooks; no FSDP2 flag to set)."""
    if zero_stage == 1 and zero_overlap_grad_reduce:
        return PER_STEP
    if zero_stage in (1, 2):
        return GradSync()  # no FSDP2 units: nothing to turn off
    if grad_sync == "per_microbatch":
        return PER_MICROBATCH
    if grad_sync == "per_step":
        return PER_STEP
    if grad_sync != "auto":
        raise ValueError(f"grad_sync={grad_sync!r}")
    if dp_replicate > 1 and dp_shard == 1:
        return PER_STEP
    if dp_replicate > 1:
        return GradSync(reduce=True, all_reduce=False)
    return PER_MICROBATCH
