"""Data parallelism through torch's own FSDP2 machinery: `fully_shard` (FSDP / ZeRO-3, and HSDP
on a 2-D replicate x shard mesh) and `replicate` (DDP built on FSDP2's param groups)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
    blocks = list(model.layers.values())
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
    for block in model.layers.values():
        replicate(block, mesh=dp_mesh, mp_policy=mp)
    replicate(model, mesh=dp_mesh, mp_policy=mp)
