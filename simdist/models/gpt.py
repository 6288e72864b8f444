"""GPT, Megatron-LM style: learned positions, LayerNorm, fused QKV, GELU 4h MLP, dropout, tied or
untied embeddings. Activations flow in Megatron's [seq, batch, hidden] layout so that the eager
attention saves exactly what Megatron's does (Korthikanti et al. 2022, section 4): Q, K and V are
views of one QKV output, the 1/sqrt(d) scaling is folded into baddbmm's alpha, softmax stays in
the activation dtype, and dropout keeps a 1-byte mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simdist.models.kernels import dropout, scaled_dot_product_attention


@dataclass(frozen=True)
class GPTArgs:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 51200
    ffn_dim: int = 0  # 0 means 4 * dim
    max_seq_len: int = 2048
    dropout: float = 0.1
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    attention: str = "flash"  # flash | eager (set from training.attention)

    @property
    def hidden_ffn(self) -> int:
        return self.ffn_dim or 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class SelfAttention(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.p = args.dropout
        self.eager = args.attention == "eager"
        self.qkv = nn.Linear(args.dim, 3 * args.dim)
        self.proj = nn.Linear(args.dim, args.dim)

    def core_attention(self, qkv: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """qkv: [s, b, heads * 3 * d] -> context [s, b, heads * d]."""
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, -1, 3 * self.head_dim)
        heads = qkv.shape[2]
        q, k, v = qkv.split(self.head_dim, dim=-1)  # views of the QKV output
        if not self.eager:
            out = scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                causal=True, dropout_p=self.p if self.training else 0.0,
            )  # [b, heads, s, d]
            return out.permute(2, 0, 1, 3).reshape(s, b, heads * self.head_dim)
        # [s, b*heads, d] views, then batch-first for bmm
        q = q.reshape(s, b * heads, self.head_dim).transpose(0, 1)
        k = k.reshape(s, b * heads, self.head_dim).transpose(0, 1)
        v = v.reshape(s, b * heads, self.head_dim).transpose(0, 1)
        scores = torch.baddbmm(
            torch.empty(b * heads, s, s, dtype=q.dtype, device=q.device),
            q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(self.head_dim),
        )
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        probs = dropout(probs, self.p, self.training)
        ctx = torch.bmm(probs, v)  # [b*heads, s, d]
        return ctx.transpose(0, 1).reshape(s, b, heads * self.head_dim)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        return self.proj(self.core_attention(self.qkv(x), causal))


class MLP(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.hidden_ffn)
        self.fc2 = nn.Linear(args.hidden_ffn, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GPTBlock(nn.Module):
    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.p = args.dropout
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = SelfAttention(args)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + dropout(self.attn(self.ln_1(x), causal), self.p, self.training)
        return x + dropout(self.mlp(self.ln_2(x)), self.p, self.training)


class GPT(nn.Module):
    # Logits come out [seq, batch, vocab] as in Megatron; the loss reads them in that layout
    # (transposing to batch-first would copy the largest activation of the model).
    seq_first_output = True

    def __init__(self, args: GPTArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim)
        self.layers = nn.ModuleDict({str(i): GPTBlock(args) for i in range(args.n_layers)})
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            b, s = tokens.shape
            positions = torch.arange(s, device=tokens.device)
            h = self.tok_embeddings(tokens) + self.pos_embeddings(positions)[None]
            h = dropout(h, self.args.dropout, self.training).transpose(0, 1)  # [s, b, h]
        else:
            h = tokens
            s = h.shape[0]
        # The causal mask is built once per step and shared by every layer (Megatron's fused
        # masked softmax keeps none; one shared mask is the closest plain PyTorch gets). Its size
        # is the tokens' sequence length: h may hold only a slice of the sequence.
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).triu_(1)
        for layer in self.layers.values():
            h = layer(h, causal)
        if self.output is None:
            return h
        return self.output(self.norm(h))  # [s, b, vocab]: see `seq_first_output`
