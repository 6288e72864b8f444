"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020) over the dp_shard group, also under tensor
parallelism (Megatron-LM's distributed optimizer).

torch has ZeRO-3 (FSDP2, used for zero_stage 3) and `ZeroRedundancyOptimizer`, which shards the
optimizer state of fp32 parameters but keeps no fp32 master copy of bf16 parameters, so it cannot
express the paper's mixed-precision accounting. This optimizer is ours and follows the paper:
- the model holds bf16 parameters, replicated over dp_shard (2 psi; under TP each rank holds its
  TP shard, a DTensor: the optimizer works on the local tensors);
- ZeRO-1: bf16 gradients are kept whole (2 psi) and reduce-scattered once per step; ZeRO-2: each
  gradient is reduce-scattered as soon as it is accumulated and only the local bf16 shard is
  kept (2 psi / N);
- the optimizer keeps this rank's shard of an fp32 master copy, momentum and variance
  (12 psi / N), steps it with torch's AdamW, and all-gathers the updated bf16 parameters.
Each parameter is sharded on its flattened local elements in `torch.chunk` fashion (padded to N
equal chunks), as FSDP does per parameter.

When the reductions run follows Megatron-LM's distributed optimizer (and DeepSpeed's ZeRO with
`overlap_comm`), both off by default there as here:
- `overlap_grad_reduce` (ZeRO-1): the reduce-scatter of a gradient runs in the backward of the
  step's last micro-batch, as soon as it is accumulated, instead of at the optimizer step. It is
  in place (the shard is this rank's chunk of the gradient, NCCL's in-place reduce-scatter), so
  the memory is the same.
- `overlap_param_gather`: the all-gather of the updated parameters runs in the next step's
  first forward, before each module that owns them (Megatron's forward pre-hooks): in one
  simulated step, the all-gathers of the previous step's update sit in its first forward, and
  the optimizer step only updates the masters.
A Replicate parameter whose gradient comes out Partial over TP (norm weights with sequence
parallelism) is all-reduced over TP first, as Megatron all-reduces those gradients."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from simdist.parallel.blocks import block_items


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, stage: int,
                 lr: float = 1e-4, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, model: nn.Module | None = None) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer is for stages 1 and 2, not {stage}")
        self.group, self.zero_stage = group, stage
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.model_params = list(params)
        self.chunk = [-(-_local(p).numel() // self.world) for p in self.model_params]
        self.masters = [torch.zeros(c, dtype=torch.float32, device=p.device)
                        for p, c in zip(self.model_params, self.chunk)]
        self.grad_shards: list[torch.Tensor | None] = [None] * len(self.model_params)
        self.inner = torch.optim.AdamW(self.masters, lr=lr, foreach=True)
        super().__init__(self.model_params, {"lr": lr})
        # ZeRO-1 with overlap: reduce in the hooks during the last micro-batch only
        self.overlap_grad_reduce = stage == 1 and overlap_grad_reduce
        self._reduce_now = stage == 2
        if stage == 2 or self.overlap_grad_reduce:
            for i, p in enumerate(self.model_params):
                p.register_post_accumulate_grad_hook(self._make_reduce_hook(i))
        self._pending_gather: set[int] = set()
        self.gather_in_forward = overlap_param_gather
        if overlap_param_gather:
            if model is None:
                raise ValueError("overlap_param_gather needs the model (its forward pre-hooks)")
            self._register_gather_hooks(model)

    # -- the step's micro-batches ---------------------------------------------------------
    def before_microbatch(self, last: bool) -> None:
        """Called before each micro-batch: ZeRO-1 with overlap reduces during the last."""
        if self.overlap_grad_reduce:
            self._reduce_now = last

    # -- gradients ------------------------------------------------------------------------
    def _flat_padded(self, t: torch.Tensor, i: int) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = self.chunk[i] * self.world - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    def _local_grad(self, i: int) -> torch.Tensor:
        p = self.model_params[i]
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            # Partial over TP -> all-reduce; the reduced gradient replaces the partial one
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        return _local(p.grad)

    def _reduce_scatter(self, i: int, in_place: bool) -> torch.Tensor:
        flat = self._flat_padded(self._local_grad(i), i)
        c = self.chunk[i]
        shard = flat[self.rank * c:(self.rank + 1) * c] if in_place else flat.new_empty(c)
        dist.reduce_scatter_tensor(shard, flat, group=self.group)
        return shard

    def _make_reduce_hook(self, i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if not self._reduce_now:
                return
            if self.zero_stage == 1:  # in place: the whole gradient stays until the step
                self.grad_shards[i] = self._reduce_scatter(i, in_place=True)
                return
            shard = self._reduce_scatter(i, in_place=False)
            prev = self.grad_shards[i]
            self.grad_shards[i] = shard if prev is None else prev.add_(shard)
            p.grad = None  # ZeRO-2 keeps only the local gradient shard

        return hook

    def gradient_tensors(self) -> list[torch.Tensor]:
        """What holds gradient bytes now (whole grads for ZeRO-1, shards for ZeRO-2)."""
        grads = [p.grad for p in self.model_params if p.grad is not None]
        return grads + [g for g in self.grad_shards if g is not None]

    # -- parameters -----------------------------------------------------------------------
    def _all_gather(self, i: int) -> None:
        p, master = self.model_params[i], self.masters[i]
        local = _local(p)
        full = local.new_empty(self.chunk[i] * self.world)
        dist.all_gather_into_tensor(full, master.to(local.dtype), group=self.group)
        with torch.no_grad():
            local.copy_(full[: local.numel()].view_as(local))

    def _register_gather_hooks(self, model: nn.Module) -> None:
        """A forward pre-hook per block (and one per stage root for the parameters outside the
        blocks), on the module the model holds: outside any checkpointed region, so a
        recompute neither repeats nor misses the all-gathers (Megatron: one per bucket)."""
        index = {id(p): i for i, p in enumerate(self.model_params)}
        roots = list(model) if isinstance(model, nn.ModuleList) else [model]
        units = roots + [block for root in roots for _, block in block_items(root)]
        owner: dict[int, nn.Module] = {}
        for unit in units:  # outer first: a block's parameters end up with the block
            for q in unit.parameters():
                if id(q) in index:
                    owner[index[id(q)]] = unit
        for unit in units:
            owned = sorted(i for i, u in owner.items() if u is unit)
            if owned:
                unit.register_forward_pre_hook(self._make_gather_hook(owned))
        self._pending_gather = set(range(len(self.model_params)))

    def _make_gather_hook(self, owned: list[int]) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            for i in owned:
                if i in self._pending_gather:
                    self._pending_gather.discard(i)
                    self._all_gather(i)

        return hook

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for i, (p, master) in enumerate(zip(self.model_params, self.masters)):
            shard = self.grad_shards[i]
            if shard is None and p.grad is not None:  # ZeRO-1 at the step
                shard = self._reduce_scatter(i, in_place=True)
            if shard is None:
                continue
            master.grad = shard.float()
        self.inner.step()
        for i, master in enumerate(self.masters):
            master.grad = None
            if not self.gather_in_forward:
                self._all_gather(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        self.grad_shards = [None] * len(self.model_params)
        self._reduce_now = self.zero_stage == 2

    def state_tensors(self) -> list[torch.Tensor]:
        """fp32 master shards + AdamW moments: the sharded optimizer state (12 psi / N)."""
        inner = [v for st in self.inner.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        return list(self.masters) + inner


def apply_zero_params(model: nn.Module, param_dtype: torch.dtype) -> None:
    """The model itself runs in the low-precision dtype; fp32 copies live in the optimizer."""
    model.to(param_dtype)
