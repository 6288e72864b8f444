"""Model zoo: plain PyTorch, parallelism-agnostic. A flavor is a family plus a named set of shape
fields (published shapes); any field can be overridden from the config. How a family is built,
parallelised and simulated is its registration in simdist/families.py."""

from __future__ import annotations

from typing import Any

# Published shapes. Llama 3: Meta's model cards / torchtitan flavors. GPT: Narayanan et al. 2021
# Table 1 (vocab 51200, seq 2048).
FLAVORS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-debug": ("llama3", dict(dim=256, n_layers=4, n_heads=16, n_kv_heads=4,
                                    vocab_size=2048, ffn_dim=768)),
    "llama3-8b": ("llama3", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                 vocab_size=128256, ffn_dim=14336)),
    "llama3-70b": ("llama3", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                  vocab_size=128256, ffn_dim=28672)),
    "llama3-405b": ("llama3", dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                                   vocab_size=128256, ffn_dim=53248)),
    "gpt": ("gpt", dict(dim=768, n_layers=12, n_heads=12, vocab_size=51200)),
    "gpt-debug": ("gpt", dict(dim=256, n_layers=4, n_heads=8, vocab_size=2048)),
    "gpt-1.7b": ("gpt", dict(dim=2304, n_layers=24, n_heads=24, vocab_size=51200)),
    "gpt-7.5b": ("gpt", dict(dim=4096, n_layers=36, n_heads=32, vocab_size=51200)),
    "gpt-39b": ("gpt", dict(dim=8192, n_layers=48, n_heads=64, vocab_size=51200)),
    "gpt-146b": ("gpt", dict(dim=12288, n_layers=80, n_heads=96, vocab_size=51200)),
    "gpt-530b": ("gpt", dict(dim=20480, n_layers=105, n_heads=128, vocab_size=51200)),
    # MoE. Mixtral 8x7B: Mistral's config.json (46.7B total). DeepSeek-MoE 16B: Dai et al. 2024
    # and its config.json (64 fine-grained experts of 1408 + 2 shared, layer 0 dense; 16.4B).
    "moe-debug": ("moe", dict(dim=256, n_layers=4, n_heads=16, n_kv_heads=4, vocab_size=2048,
                              ffn_dim=768, moe_ffn_dim=256, n_experts=8, top_k=2,
                              n_shared_experts=1, n_dense_layers=1)),
    "mixtral-8x7b": ("moe", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                 vocab_size=32000, ffn_dim=14336, moe_ffn_dim=14336, n_experts=8,
                                 top_k=2, route_norm=True, rope_theta=1e6)),
    "deepseek-moe-16b": ("moe", dict(dim=2048, n_layers=28, n_heads=16, n_kv_heads=16,
                                     vocab_size=102400, ffn_dim=10944, moe_ffn_dim=1408,
                                     n_experts=64, top_k=6, n_shared_experts=2, n_dense_layers=1,
                                     norm_eps=1e-6, rope_theta=10000.0)),
}
