"""A Llama 3 written the way third-party code is (torchtitan's layout: tok_embeddings, `layers`
as a ModuleDict, norm, output; separate wq/wk/wv and w1/w3), calling only public PyTorch:
`nn.RMSNorm`, `F.scaled_dot_product_attention`, `F.silu`. Nothing in it knows about simdist
or the GPU kernels; the dispatch-level CUDA semantics (simdist/mode/cuda.py) must make it cost
exactly what simdist's own llama3 (which calls the CUDA kernels directly) costs.

Also a model shaped like torchtitan's own (`TitanLlama`: `model.layers` under a wrapper, a
forward taking `tokens`) for the entrypoint tests (`blocks: model.layers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rope(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        c, sn = cos[None, :s, None, :], sin[None, :s, None, :]
        q = q * c + _rotate_half(q) * sn
        k = k * c + _rotate_half(k) * sn
        rep = q.shape[2] // k.shape[2]
        if rep > 1:  # torchtitan's repeat_kv
            kv = k.shape[2]
            k = k[:, :, :, None, :].expand(b, s, kv, rep, self.head_dim).reshape(b, s, kv * rep, -1)
            v = v[:, :, :, None, :].expand(b, s, kv, rep, self.head_dim).reshape(b, s, kv * rep, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class PlainLlama(nn.Module):
    def __init__(self, dim: int = 4096, n_layers: int = 32, n_heads: int = 32,
                 n_kv_heads: int = 8, vocab_size: int = 128256, ffn_dim: int = 14336,
                 norm_eps: float = 1e-5, rope_theta: float = 500000.0,
                 max_seq_len: int = 8192) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.rope_theta = dim // n_heads, max_seq_len, rope_theta
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, n_heads, n_kv_heads, ffn_dim, norm_eps)
                                     for i in range(n_layers)})
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        cos, sin = _rope(self.head_dim, self.max_seq_len, self.rope_theta)
        cos, sin = cos.to(device=h.device, dtype=h.dtype), sin.to(device=h.device, dtype=h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def plain_llama(**kwargs) -> PlainLlama:
    return PlainLlama(**kwargs)


class _Inner(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, **kw) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList([Block(dim, **kw) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(dim, eps=kw["eps"])


class TitanLlama(nn.Module):
    """Blocks at `model.layers` (a ModuleList), not at `layers`: found by `blocks:`."""

    def __init__(self, dim: int = 256, n_layers: int = 2, n_heads: int = 8, n_kv_heads: int = 4,
                 vocab_size: int = 1024, ffn_dim: int = 512, max_seq_len: int = 512) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len = dim // n_heads, max_seq_len
        self.model = _Inner(vocab_size, dim, n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            ffn_dim=ffn_dim, eps=1e-5)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(tokens)
        cos, sin = _rope(self.head_dim, self.max_seq_len, 500000.0)
        cos, sin = cos.to(dtype=h.dtype), sin.to(dtype=h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


def titan_llama(**kwargs) -> TitanLlama:
    return TitanLlama(**kwargs)
