"""Mixture-of-experts decoder (Mixtral, DeepSeek-MoE), written as torchtitan writes its MoE:
llama3 attention blocks, and in place of the dense feed-forward a `MoE` module made of a
token-choice top-k router (`router.gate`), routed SwiGLU experts stored as stacked weights
(`GroupedExperts`: w1/w3 [n_experts, hidden, dim], w2 [n_experts, dim, hidden]) and optional
always-on shared experts (`shared_experts`, one dense SwiGLU of n_shared * moe_ffn_dim). The first
`n_dense_layers` blocks keep a dense `feed_forward`.

Routing under fake tensors. The router runs for real (gate matmul, softmax/sigmoid in fp32,
top-k, the argsort that groups token copies by expert: their FLOPs and memory are recorded), but
how many copies each expert gets cannot come from fake data. It comes from the layer's `routing`
string (see simdist/models/routing.py), set from `MoEArgs.routing` by the builder and changeable
with `set_routing`. The layer turns it into a Python list of per-expert counts and hands it to
`experts(routed_input, counts)`; the experts split their input by those counts. Nothing here
knows about parallelism: expert parallelism (simdist/parallel/expert_parallel.py) wraps the
`experts` module's forward and rewrites its input and counts, as torchtitan's ExpertParallel
style does with its input/output hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from simdist.models.llama3 import Attention, FeedForward, Llama3, RMSNorm
from simdist.models.routing import expert_token_counts


@dataclass(frozen=True)
class MoEArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    ffn_dim: int = 14336  # dense feed-forward hidden size (the first n_dense_layers blocks)
    moe_ffn_dim: int = 14336  # hidden size of one routed (and one shared) expert
    n_experts: int = 8
    top_k: int = 2
    n_shared_experts: int = 0
    n_dense_layers: int = 0
    score_func: str = "softmax"  # softmax | sigmoid
    route_norm: bool = False  # renormalise the top-k scores to sum to 1 (Mixtral)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 131072
    routing: str = "balanced"  # balanced | zipf:<alpha> | file:<path>, see models/routing.py

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be softmax or sigmoid, got {self.score_func!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# --- grouped GEMM ----------------------------------------------------------------------------
# torch 2.13 has a meta kernel and autograd for `aten._grouped_mm` but no FLOP formula, so the
# op counter would count the experts' matmuls as 0. The formula does not depend on how the rows
# are split among the groups: sum over groups of 2*m_g*k*n = 2*M*k*n.
if torch.ops.aten._grouped_mm not in flop_registry:  # pragma: no branch

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flop(a_shape, b_shape, offs_shape=None, bias_shape=None,  # noqa: ANN001, ANN202
                         out_dtype=None, *, out_shape=None, **kwargs):
        if len(a_shape) == 2 and len(b_shape) == 2:  # jagged K (weight gradients): [G, M, N] out
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        numel = 1
        for d in out_shape:
            numel *= d
        return 2 * numel * a_shape[-1]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """`torch._grouped_mm` runs (and has a fake/meta kernel) for bf16 only, with 16-byte aligned
    rows; otherwise the experts run one matmul each."""
    return (hasattr(torch, "_grouped_mm") and x.dtype == w.dtype == torch.bfloat16
            and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 and w.shape[-1] % 8 == 0
            and (not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0)))


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU experts as stacked weights (torchtitan's GroupedExperts). `forward`
    takes the token copies sorted by expert and the per-expert counts (a list of ints)."""

    def __init__(self, dim: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.w1.shape[0]:
            raise ValueError(f"{len(counts)} expert counts for {self.w1.shape[0]} local experts")
        if sum(counts) != x.shape[0]:
            raise ValueError(f"expert counts sum to {sum(counts)}, input has {x.shape[0]} rows")
        w1, w2, w3 = self.w1, self.w2, self.w3
        if grouped_mm_supported(x, w1):
            # Cumulative row offsets, a constant of the static routing (int32, as the kernel wants).
            ends, acc = [], 0
            for c in counts:
                acc += c
                ends.append(acc)
            offs = torch.tensor(ends, dtype=torch.int32, device=x.device)
            h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        # One matmul per expert (torchtitan's for-loop path). `unbind` keeps the weight gradient
        # one stacked tensor (select would allocate a full-size zero gradient per expert).
        outs = []
        for xe, a, b, c in zip(torch.split(x, counts), w1.unbind(0), w2.unbind(0), w3.unbind(0)):
            h = F.silu(xe @ a.transpose(0, 1)) * (xe @ c.transpose(0, 1))
            outs.append(h @ b.transpose(0, 1))
        return torch.cat(outs)


class TokenChoiceTopKRouter(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, score_func: str,
                 route_norm: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, dim] -> top-k scores (fp32) and expert indices, both [T, top_k]."""
        logits = self.gate(x).float()
        if self.score_func == "softmax":
            scores = F.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        top_scores, selected = torch.topk(scores, k=self.top_k, dim=-1)
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        return top_scores, selected


class MoE(nn.Module):
    """Router + routed experts (+ shared experts). Token counts per expert come from
    `self.routing` (static, see the module docstring)."""

    def __init__(self, args: MoEArgs, layer_id: int) -> None:
        super().__init__()
        self.n_experts = args.n_experts
        self.top_k = args.top_k
        self.layer_id = layer_id
        self.routing = args.routing
        self.router = TokenChoiceTopKRouter(args.dim, args.n_experts, args.top_k, args.score_func,
                                            args.route_norm)
        self.experts = GroupedExperts(args.dim, args.moe_ffn_dim, args.n_experts)
        self.shared_experts = (FeedForward(args.dim, args.n_shared_experts * args.moe_ffn_dim)
                               if args.n_shared_experts > 0 else None)

    def expert_counts(self, n_tokens: int) -> list[int]:
        return expert_token_counts(self.routing, n_tokens, self.n_experts, self.top_k,
                                   self.layer_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        x = x.reshape(-1, dim)
        n_tokens = x.shape[0]
        top_scores, selected = self.router(x)
        # Group the token copies by expert, as torchtitan's reorderer does (stable argsort of
        # the chosen expert ids); the group sizes are the static counts.
        order = torch.argsort(selected.reshape(-1), stable=True)
        scores_sorted = top_scores.reshape(-1)[order]
        token_index = (order // self.top_k).reshape(-1, 1).expand(-1, dim)
        routed_input = torch.gather(x, 0, token_index)
        routed_output = self.experts(routed_input, self.expert_counts(n_tokens))
        routed_output = (routed_output.float() * scores_sorted.reshape(-1, 1)).to(x.dtype)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        out = out.scatter_add(0, token_index, routed_output)
        return out.reshape(b, s, dim)


class MoEBlock(nn.Module):
    def __init__(self, args: MoEArgs, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)  # reads dim, n_heads, n_kv_heads, head_dim
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe_enabled = layer_id >= args.n_dense_layers
        if self.moe_enabled:
            self.moe = MoE(args, layer_id)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class MoETransformer(Llama3):
    """Llama3 with MoE blocks: the same skeleton and forward (tok_embeddings, layers ModuleDict,
    norm, output), so data parallel, checkpointing and pipeline code treat it alike."""

    def make_block(self, args: MoEArgs, layer_id: int) -> nn.Module:
        return MoEBlock(args, layer_id)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_routing(model: nn.Module, routing: str) -> None:
    """Use `routing` (balanced | zipf:<alpha> | file:<path>) in every MoE layer of `model`."""
    routing = routing.strip()
    for m in moe_layers(model):
        expert_token_counts(routing, 1, m.n_experts, m.top_k, m.layer_id)  # fail early if bad
        m.routing = routing


__all__ = ["MoEArgs", "MoETransformer", "MoE", "GroupedExperts", "TokenChoiceTopKRouter",
           "moe_layers", "set_routing", "grouped_mm_supported"]
