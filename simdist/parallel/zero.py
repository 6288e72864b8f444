"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020) over the dp_shard group, also under tensor
parallelism (Megatron-LM's distributed optimizer).

torch has ZeRO-3 (FSDP2, used for zero_stage 3) and `ZeroRedundancyOptimizer`, which shards the
optimizer state of fp32 parameters but keeps no fp32 master copy of bf16 parameters, so it cannot
express the paper's mixed-precision accounting. This optimizer is ours and follows the paper:
- the model holds bf16 parameters, replicated over dp_shard (2 psi; under TP each rank holds its
  TP shard, a DTensor: the optimizer works on the local tensors);
- ZeRO-1: bf16 gradients are kept whole (2 psi) and reduce-scattered once per step; ZeRO-2: each
  gradient is reduce-scattered as soon as its bucket is complete and only the local bf16 shard
  is kept (2 psi / N);
- the optimizer keeps this rank's shard of an fp32 master copy, momentum and variance
  (12 psi / N), steps it with torch's AdamW, and all-gathers the updated bf16 parameters.

Collectives run per bucket, one bucket per block and one for a stage's parameters outside its
blocks (as simdist's DDP reduces per FSDP2 unit). DeepSpeed and Megatron-LM bucket by size
instead (Megatron: at least max(40M, 1M x dp) elements in backward order, across block
boundaries); for blocks of 40M elements or more (hidden >= 2048) the two differ only in where a
bucket ends, and a bucket per block keeps every block's events alike (the layer memo). A bucket
is padded to N equal chunks and rank r owns chunk r of it. Its gradients are copied into one
flat buffer for the reduce-scatter (DeepSpeed's contiguous-gradient copy), its parameters out of
the all-gathered flat buffer.

When the reductions run follows Megatron-LM's distributed optimizer (and DeepSpeed's ZeRO with
`overlap_comm`), both off by default there as here:
- `overlap_grad_reduce` (ZeRO-1): a bucket's reduce-scatter runs in the backward of the step's
  last micro-batch, as soon as its gradients are accumulated, instead of at the optimizer step.
- `overlap_param_gather`: the all-gather of the updated parameters runs in the next step's
  first forward (Megatron's forward pre-hooks): in one simulated step, the all-gathers of the
  previous step's update sit in its first forward, each unit's hook waiting for its own buckets
  and issuing the next unit's; the optimizer step only updates the masters.
A Replicate parameter whose gradient comes out Partial over TP (norm weights with sequence
parallelism) is all-reduced over TP first, as Megatron all-reduces those gradients.

`grad_dtype=torch.float32` (ZeRO-1) is Megatron's `main_grad`: a persistent fp32 buffer per
parameter that each backward accumulates into (the bf16 .grad is freed at once; TP-partial sums
accumulate and are all-reduced when the bucket is reduced), reduce-scattered in fp32: 6 + 12/N
bytes per parameter, Megatron's own table for bf16 parameters with fp32 gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from simdist.parallel.blocks import block_items


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Bucket:
    params: tuple[int, ...]  # indices into model_params, in backward order
    numel: int  # local elements of its parameters
    shard: int  # elements of the padded bucket per rank


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, stage: int,
                 model: nn.Module, lr: float = 1e-4, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False,
                 grad_dtype: torch.dtype | None = None) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer is for stages 1 and 2, not {stage}")
        if grad_dtype is not None and stage != 1:
            raise ValueError("an fp32 gradient buffer is ZeRO-1's (Megatron's main_grad)")
        self.group, self.zero_stage = group, stage
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.model_params = list(params)
        units, unit_params = self._units(model)
        self.bucket_units: list[nn.Module] = []  # forward order
        self.buckets: list[Bucket] = []
        for unit, owned in zip(units, unit_params):
            if owned:
                n = sum(_local(self.model_params[i]).numel() for i in owned)
                self.bucket_units.append(unit)
                self.buckets.append(Bucket(tuple(owned), n, -(-n // self.world)))
        self.bucket_of = {i: b for b, bk in enumerate(self.buckets) for i in bk.params}
        dev = self.model_params[0].device if self.model_params else torch.device("cpu")
        self.masters = [torch.zeros(bk.shard, dtype=torch.float32, device=dev)
                        for bk in self.buckets]
        self.grad_shards: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.inner = torch.optim.AdamW(self.masters, lr=lr, foreach=True)
        super().__init__(self.model_params, {"lr": lr})
        # ZeRO-1 with overlap: reduce in the hooks during the last micro-batch only
        self.overlap_grad_reduce = stage == 1 and overlap_grad_reduce
        self._reduce_now = stage == 2
        self._ready = [0] * len(self.buckets)
        # Megatron's main_grad: a persistent gradient buffer in grad_dtype that each backward
        # accumulates into (the parameter's own .grad is freed at once)
        self.main_grads: list[torch.Tensor] | None = None
        self._partial: set[int] = set()  # main grads holding TP-partial sums (all-reduced later)
        if grad_dtype is not None:
            self.main_grads = [torch.zeros(_local(q).shape, dtype=grad_dtype, device=dev)
                               for q in self.model_params]
        self._has_grad = [False] * len(self.buckets)
        if stage == 2 or self.overlap_grad_reduce or self.main_grads is not None:
            for i, p in enumerate(self.model_params):
                p.register_post_accumulate_grad_hook(self._make_reduce_hook(i))
        self._pending_gather: set[int] = set()
        self._gathered: dict[int, torch.Tensor] = {}  # bucket -> all-gathered, not copied out
        self.gather_in_forward = overlap_param_gather
        if overlap_param_gather:
            self._register_gather_hooks()

    def _units(self, model: nn.Module) -> tuple[list[nn.Module], list[list[int]]]:
        """The modules a bucket belongs to: each stage root (its parameters outside the blocks)
        followed by its blocks, in forward order; and each unit's parameters, in backward
        order."""
        index = {id(p): i for i, p in enumerate(self.model_params)}
        roots = list(model) if isinstance(model, nn.ModuleList) else [model]
        units = [u for root in roots for u in [root] + [b for _, b in block_items(root)]]
        owner: dict[int, int] = {}
        for u, unit in enumerate(units):  # outer first: a block's parameters end up with it
            for q in unit.parameters():
                if id(q) in index:
                    owner[index[id(q)]] = u
        params = [sorted((i for i, o in owner.items() if o == u), reverse=True)
                  for u in range(len(units))]
        return units, params

    # -- the step's micro-batches ---------------------------------------------------------
    def before_microbatch(self, last: bool) -> None:
        """Called before each micro-batch: ZeRO-1 with overlap reduces during the last."""
        if self.overlap_grad_reduce:
            self._reduce_now = last

    # -- gradients ------------------------------------------------------------------------
    def _local_grad(self, i: int) -> torch.Tensor:
        p = self.model_params[i]
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            # Partial over TP -> all-reduce; the reduced gradient replaces the partial one
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        return _local(p.grad)

    def _accumulate_main_grad(self, i: int) -> None:
        p, main = self.model_params[i], self.main_grads[i]
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            self._partial.add(i)  # summed over TP when the bucket is reduced (Megatron)
            main.add_(g.to_local())
        else:
            main.add_(self._local_grad(i))
        p.grad = None

    def _bucket_grad(self, i: int) -> torch.Tensor:
        if self.main_grads is None:
            return self._local_grad(i)
        main = self.main_grads[i]
        if i in self._partial:
            self._partial.discard(i)
            p = self.model_params[i]
            dist.all_reduce(main, group=p.device_mesh.get_group())
        return main

    def _reduce_scatter(self, b: int) -> torch.Tensor:
        bk = self.buckets[b]
        parts = [self._bucket_grad(i).reshape(-1) for i in bk.params]
        pad = bk.shard * self.world - bk.numel
        if pad:
            parts.append(parts[0].new_zeros(pad))
        flat = torch.cat(parts)  # the bucket's contiguous copy
        shard = flat.new_empty(bk.shard)
        dist.reduce_scatter_tensor(shard, flat, group=self.group)
        return shard

    def _reduce_bucket(self, b: int) -> None:
        shard = self._reduce_scatter(b)
        prev = self.grad_shards[b]
        self.grad_shards[b] = shard if prev is None else prev.add_(shard)
        if self.zero_stage == 2:
            for i in self.buckets[b].params:
                self.model_params[i].grad = None  # ZeRO-2 keeps only the local shard

    def _make_reduce_hook(self, i: int) -> Any:
        b = self.bucket_of[i]

        def hook(p: torch.Tensor) -> None:
            self._has_grad[b] = True
            if self.main_grads is not None:
                self._accumulate_main_grad(i)
            if not self._reduce_now:
                return
            self._ready[b] += 1
            if self._ready[b] == len(self.buckets[b].params):
                self._ready[b] = 0
                self._reduce_bucket(b)

        return hook

    def gradient_tensors(self) -> list[torch.Tensor]:
        """What holds gradient bytes now (whole grads for ZeRO-1, shards for ZeRO-2)."""
        grads = [p.grad for p in self.model_params if p.grad is not None]
        return grads + (self.main_grads or []) + [g for g in self.grad_shards if g is not None]

    def resident_gradient_tensors(self) -> list[torch.Tensor]:
        """Gradient storage alive across steps (Megatron's main_grad buffer)."""
        return list(self.main_grads or [])

    # -- parameters -----------------------------------------------------------------------
    def _all_gather(self, b: int) -> None:
        """Issue bucket b's all-gather into a flat buffer; `_copy_out` fills the parameters."""
        bk = self.buckets[b]
        dtype = _local(self.model_params[bk.params[0]]).dtype
        full = self.masters[b].new_empty(bk.shard * self.world, dtype=dtype)
        dist.all_gather_into_tensor(full, self.masters[b].to(dtype), group=self.group)
        self._gathered[b] = full

    def _copy_out(self, b: int) -> None:
        full, offset = self._gathered.pop(b), 0
        with torch.no_grad():
            for i in self.buckets[b].params:
                local = _local(self.model_params[i])
                local.copy_(full[offset:offset + local.numel()].view_as(local))
                offset += local.numel()

    def _register_gather_hooks(self) -> None:
        """A forward pre-hook per bucket's unit, on the module the model holds: outside any
        checkpointed region, so a recompute neither repeats nor misses the all-gathers. Each
        hook gathers its own bucket (if not yet issued) and the next unit's, which then runs
        beside this unit's forward."""
        n = len(self.buckets)
        for b, unit in enumerate(self.bucket_units):
            unit.register_forward_pre_hook(self._make_gather_hook(b, b + 1 if b + 1 < n else None))
        self._pending_gather = set(range(n))

    def _make_gather_hook(self, own: int, nxt: int | None) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if own in self._pending_gather:  # the first unit: nothing issued it before
                self._pending_gather.discard(own)
                self._all_gather(own)
            if own in self._gathered:  # waits for its all-gather, issued one unit earlier
                self._copy_out(own)
            if nxt is not None and nxt in self._pending_gather:
                self._pending_gather.discard(nxt)
                self._all_gather(nxt)

        return hook

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for b, bk in enumerate(self.buckets):
            if self.grad_shards[b] is None and (self._has_grad[b] or all(
                    self.model_params[i].grad is not None for i in bk.params)):
                self._reduce_bucket(b)  # ZeRO-1 at the step
            if self.grad_shards[b] is not None:
                self.masters[b].grad = self.grad_shards[b].float()
        self.inner.step()
        for b, master in enumerate(self.masters):
            master.grad = None
            if not self.gather_in_forward:
                self._all_gather(b)
                self._copy_out(b)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        for main in self.main_grads or []:
            main.zero_()  # Megatron's zero_grad_buffer: the buffer stays
        self._has_grad = [False] * len(self.buckets)
        self.grad_shards = [None] * len(self.buckets)
        self._reduce_now = self.zero_stage == 2

    def state_tensors(self) -> list[torch.Tensor]:
        """fp32 master shards + AdamW moments: the sharded optimizer state (12 psi / N)."""
        inner = [v for st in self.inner.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        return list(self.masters) + inner


def apply_zero_params(model: nn.Module, param_dtype: torch.dtype) -> None:
    """The model itself runs in the low-precision dtype; fp32 copies live in the optimizer."""
    model.to(param_dtype)
