"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020) over the dp_shard group.

torch has ZeRO-3 (FSDP2, used for zero_stage 3) and `ZeroRedundancyOptimizer`, which shards the
optimizer state of fp32 parameters but keeps no fp32 master copy of bf16 parameters, so it cannot
express the paper's mixed-precision accounting. This optimizer is ours and follows the paper:
- the model holds bf16 parameters, replicated (2 psi);
- ZeRO-1: bf16 gradients are kept whole (2 psi) and reduce-scattered at the optimizer step;
  ZeRO-2: each gradient is reduce-scattered as soon as it is accumulated and only the local bf16
  shard is kept (2 psi / N);
- the optimizer keeps this rank's shard of an fp32 master copy, momentum and variance
  (12 psi / N), steps it with torch's AdamW, and all-gathers the updated bf16 parameters.
Each parameter is sharded on its flattened elements in `torch.chunk` fashion (padded to N equal
chunks), as FSDP does per parameter."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, stage: int,
                 lr: float = 1e-4) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer is for stages 1 and 2, not {stage}")
        self.group, self.zero_stage = group, stage
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.model_params = list(params)
        self.chunk = [-(-p.numel() // self.world) for p in self.model_params]
        self.masters = [torch.zeros(c, dtype=torch.float32, device=p.device)
                        for p, c in zip(self.model_params, self.chunk)]
        self.grad_shards: list[torch.Tensor | None] = [None] * len(self.model_params)
        self.inner = torch.optim.AdamW(self.masters, lr=lr, foreach=True)
        super().__init__(self.model_params, {"lr": lr})
        if stage == 2:
            for i, p in enumerate(self.model_params):
                p.register_post_accumulate_grad_hook(self._make_reduce_hook(i))

    # -- gradients ------------------------------------------------------------------------
    def _flat_padded(self, t: torch.Tensor, i: int) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = self.chunk[i] * self.world - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    def _reduce_scatter(self, grad: torch.Tensor, i: int) -> torch.Tensor:
        shard = grad.new_empty(self.chunk[i])
        dist.reduce_scatter_tensor(shard, self._flat_padded(grad, i), group=self.group)
        return shard

    def _make_reduce_hook(self, i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            shard = self._reduce_scatter(p.grad, i)
            prev = self.grad_shards[i]
            self.grad_shards[i] = shard if prev is None else prev.add_(shard)
            p.grad = None  # ZeRO-2 keeps only the local gradient shard

        return hook

    def gradient_tensors(self) -> list[torch.Tensor]:
        """What holds gradient bytes now (whole grads for ZeRO-1, shards for ZeRO-2)."""
        grads = [p.grad for p in self.model_params if p.grad is not None]
        return grads + [g for g in self.grad_shards if g is not None]

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for i, (p, master) in enumerate(zip(self.model_params, self.masters)):
            shard = self.grad_shards[i]
            if p.grad is not None:  # ZeRO-1 (or a gradient set directly)
                shard = self._reduce_scatter(p.grad, i)
            if shard is None:
                continue
            master.grad = shard.float()
        self.inner.step()
        for i, (p, master) in enumerate(zip(self.model_params, self.masters)):
            master.grad = None
            full = p.new_empty(self.chunk[i] * self.world)
            dist.all_gather_into_tensor(full, master.to(p.dtype), group=self.group)
            p.copy_(full[: p.numel()].view_as(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        self.grad_shards = [None] * len(self.model_params)

    def state_tensors(self) -> list[torch.Tensor]:
        """fp32 master shards + AdamW moments: the sharded optimizer state (12 psi / N)."""
        inner = [v for st in self.inner.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        return list(self.masters) + inner


def apply_zero_params(model: nn.Module, param_dtype: torch.dtype) -> None:
    """The model itself runs in the low-precision dtype; fp32 copies live in the optimizer."""
    model.to(param_dtype)
