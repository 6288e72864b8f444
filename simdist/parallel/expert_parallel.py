"""Expert parallelism: the routed experts of every MoE layer sharded over an EP group, token
copies dispatched to the ranks that hold their experts with an all-to-all and brought back with
the reverse all-to-all (torchtitan's ExpertParallel style, built on the same autograd-aware
functional `all_to_all_single`).

With `ep` ranks and E experts, EP rank r holds experts [r*E/ep, (r+1)*E/ep) as plain local
parameters of shape [E/ep, ...]. In every MoE layer, around `moe.experts`:

1. the counts all-to-all: torchtitan first exchanges `num_tokens_per_expert` (E integers) so each
   rank learns what it will receive; the static routing already knows, but the collective is
   issued for its latency and its place in the trace (its result is not used);
2. dispatch: `all_to_all_single(routed_input, output_split_sizes, input_split_sizes)`: this rank
   sends to rank j the copies routed to j's experts (`ep_split_sizes`); every rank of the group
   routes with the same static counts, so rank j receives ep x its experts' share. The
   functional collective allocates its output from `output_split_sizes`, so under the fake
   process group (where collectives return their input untouched) the received buffer, and all
   the expert compute downstream, already have the receiving rank's size;
3. the received rows, grouped by source rank, are permuted to be grouped by local expert (one
   index gather, as torchtitan's `_permute`), the experts run on ep x their counts, the result is
   un-permuted (index_put) and
4. combine: the reverse all-to-all (splits swapped). Backward runs both all-to-alls again,
   reversed, through autograd.

A rank holding hot experts (zipf routing) therefore receives more tokens, and its recorded
FLOPs, activation memory and collective bytes grow accordingly.

Not handled here (for the integration): the gradient reduction of the experts over the ranks
that hold the same experts (torchtitan's `dp_mod_ep` FSDP mesh); expert tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from simdist.models.moe import MoE, moe_layers, set_routing
from simdist.models.routing import ep_split_sizes, expert_token_counts

# What combine needs from dispatch: the dispatch's input and output split sizes, and the
# permutation that grouped the received rows by local expert (None when there was none).
_CombineState = tuple[list[int], list[int], "torch.Tensor | None"]


@dataclass
class ExpertParallel:
    """Expert parallelism of one MoE layer's `experts` module (torchtitan's ExpertParallel
    style: the layer calls `experts(routed_input, counts)` with all its token copies sorted by
    global expert; dispatch/combine wrap the experts' own computation)."""

    group: dist.ProcessGroup
    ep: int
    ep_rank: int
    n_experts: int  # global
    exchange_counts: bool = True

    @property
    def local_experts(self) -> int:
        return self.n_experts // self.ep

    @property
    def expert_range(self) -> tuple[int, int]:
        lo = self.ep_rank * self.local_experts
        return lo, lo + self.local_experts

    def dispatch(self, routed_input: torch.Tensor, counts: list[int]
                 ) -> tuple[torch.Tensor, list[int], _CombineState]:
        """Global expert-sorted copies -> this rank's received copies grouped by local expert,
        their per-expert counts, and what `combine` needs."""
        if len(counts) != self.n_experts:
            raise ValueError(f"EP expects {self.n_experts} global expert counts, got {len(counts)}")
        lo, hi = self.expert_range
        local = list(counts[lo:hi])
        input_splits = ep_split_sizes(list(counts), self.ep)
        output_splits = [sum(local)] * self.ep
        if self.exchange_counts:
            counts_t = torch.tensor(list(counts), dtype=torch.int64, device=routed_input.device)
            funcol.wait_tensor(funcol.all_to_all_single(counts_t, None, None, self.group))
        received = funcol.all_to_all_single_autograd(routed_input, output_splits, input_splits,
                                                     self.group)
        perm = None
        if self.ep > 1 and self.local_experts > 1:
            # received rows: [source rank][local expert] blocks; regroup as [local expert][source].
            idx = torch.arange(received.shape[0], device=received.device).view(self.ep, -1)
            blocks, start = [], 0
            for c in local:
                blocks.append(idx[:, start:start + c].reshape(-1))
                start += c
            perm = torch.cat(blocks)
            received = received[perm]
        return received, [self.ep * c for c in local], (input_splits, output_splits, perm)

    def combine(self, output: torch.Tensor, state: _CombineState) -> torch.Tensor:
        input_splits, output_splits, perm = state
        if perm is not None:
            unpermuted = output.new_empty(output.shape)
            unpermuted[perm] = output
            output = unpermuted
        return funcol.all_to_all_single_autograd(output, input_splits, output_splits, self.group)

    def wrap(self, experts: nn.Module) -> None:
        """Run dispatch and combine inside `experts`' own call (an instance `forward`), so that
        both all-to-alls are attributed to the experts module."""
        inner = experts.forward

        def forward(routed_input: torch.Tensor, counts: list[int]) -> torch.Tensor:
            received, local_counts, state = self.dispatch(routed_input, counts)
            return self.combine(inner(received, local_counts), state)

        experts.forward = forward


def _group_of(ep: DeviceMesh | dist.ProcessGroup) -> dist.ProcessGroup:
    if isinstance(ep, DeviceMesh):
        if ep.ndim != 1:
            raise ValueError(f"apply_ep needs a 1-D EP mesh, got {ep.ndim} dims")
        return ep.get_group()
    return ep


def _shard_param(p: nn.Parameter, lo: int, hi: int) -> nn.Parameter:
    # On meta this allocates nothing; on a real device it keeps this rank's experts' weights.
    return nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)


def apply_ep(model: nn.Module, ep: DeviceMesh | dist.ProcessGroup, ep_rank: int | None = None,
             routing: str | None = None, *, exchange_counts: bool = True) -> list[ExpertParallel]:
    """Shard every MoE layer's routed experts over the EP group and install the all-to-all
    dispatch/combine. Call on the meta model, before data parallelism and materialisation.
    `ep_rank` defaults to this process's rank in the group; `routing` (if given) replaces the
    model's routing in every MoE layer (see `set_routing`). Returns one ExpertParallel per layer."""
    group = _group_of(ep)
    size = dist.get_world_size(group)
    rank = dist.get_rank(group) if ep_rank is None else ep_rank
    if not 0 <= rank < size:
        raise ValueError(f"ep_rank={rank} outside an EP group of {size}")
    if routing is not None:
        set_routing(model, routing)
    styles = []
    for moe in moe_layers(model):
        if moe.n_experts % size:
            raise ValueError(f"ep={size} must divide n_experts={moe.n_experts}")
        style = ExpertParallel(group, size, rank, moe.n_experts, exchange_counts)
        lo, hi = style.expert_range
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            setattr(experts, name, _shard_param(getattr(experts, name), lo, hi))
        experts.n_experts = hi - lo
        style.wrap(experts)
        moe.expert_parallel = style  # for inspection; the layer's forward does not read it
        styles.append(style)
    return styles


def ep_received_counts(model_or_args: Any, routing: str, n_tokens: int, ep: int,
                       ep_rank: int) -> tuple[tuple[int, ...], ...]:
    """Per MoE layer, the token copies each local expert of EP rank `ep_rank` processes when every
    rank routes `n_tokens` tokens (micro_batch x its sequence length) with `routing`: ep x the
    expert's count. Two EP ranks with equal tuples do identical work (a rank-class key)."""
    if isinstance(model_or_args, nn.Module):
        layers = [(m.layer_id, m.n_experts, m.top_k) for m in moe_layers(model_or_args)]
    else:
        a = model_or_args
        layers = [(i, a.n_experts, a.top_k) for i in range(a.n_dense_layers, a.n_layers)]
    out = []
    for layer, n_experts, top_k in layers:
        if n_experts % ep:
            raise ValueError(f"ep={ep} must divide n_experts={n_experts}")
        per = n_experts // ep
        counts = expert_token_counts(routing, n_tokens, n_experts, top_k, layer)
        out.append(tuple(ep * c for c in counts[ep_rank * per:(ep_rank + 1) * per]))
    return tuple(out)


__all__ = ["apply_ep", "ExpertParallel", "ep_received_counts", "MoE"]
