"""Tensor + sequence parallelism through DTensor (`parallelize_module`), with torchtitan's llama3
plan: colwise wq/wk/wv and w1/w3, rowwise wo and w2, sequence-parallel norms, a rowwise embedding
and a colwise output head kept sharded on the vocabulary for `loss_parallel`."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from simdist.models.kernels import _fused_rms_norm


@register_sharding(_fused_rms_norm._opoverload)
def _rms_norm_sharding(x, weight, eps):  # noqa: ANN001, ANN202
    """RMSNorm normalises the last dim: any other dim may stay sharded; the weight is replicated
    (torch registers the same rule for aten._fused_rms_norm, which a CPU build cannot run)."""
    strategies = [([Replicate(), Replicate()], [Replicate(), Replicate(), None])]
    for d in range(x.ndim - 1):
        strategies.append(([Shard(d), Shard(d)], [Shard(d), Replicate(), None]))
    return strategies


def apply_tp_llama3(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                    loss_parallel: bool = True) -> None:
    seq = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else None
    top: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq,
                                  output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if norm_style is not None:
        top["norm"] = norm_style
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": ColwiseParallel(),
        }
        if norm_style is not None:
            plan["attention_norm"] = norm_style
            plan["ffn_norm"] = norm_style
        parallelize_module(block, tp_mesh, plan)


__all__ = ["apply_tp_llama3", "torch"]
