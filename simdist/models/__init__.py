"""Model zoo: plain PyTorch, parallelism-agnostic. A flavor is a family plus a named set of shape
fields; any field can be overridden from the config. `build_model` makes the module on meta."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from simdist.models.gpt import GPT, GPTArgs
from simdist.models.llama3 import Llama3, Llama3Args
from simdist.models.moe import MoEArgs, MoETransformer


@dataclass(frozen=True)
class Family:
    name: str
    args_cls: type
    model_cls: Callable[[Any], nn.Module]


FAMILIES: dict[str, Family] = {
    "llama3": Family("llama3", Llama3Args, Llama3),
    "gpt": Family("gpt", GPTArgs, GPT),
    "moe": Family("moe", MoEArgs, MoETransformer),
}

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


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the family and its full argument dataclass (or a user entrypoint)."""

    family: str
    args: Any = None
    entrypoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int | None:
        return getattr(self.args, "n_layers", None)


class ModelError(ValueError):
    """Bad model selection; `key` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def shape_fields(family: str) -> list[str]:
    return [f.name for f in dataclasses.fields(FAMILIES[family].args_cls)]


def resolve_model(preset: str, overrides: dict[str, Any], *, seq_len: int,
                  attention: str, routing: str = "balanced") -> ModelSpec:
    """Flavor + overrides -> ModelSpec. Raises ModelError naming the bad key."""
    if preset not in FLAVORS:
        raise ModelError("model.preset", f"unknown preset {preset!r}; allowed: {', '.join(FLAVORS)}")
    family, base = FLAVORS[preset]
    allowed = shape_fields(family)
    fields = dict(base)
    for key, value in overrides.items():
        if key not in allowed:
            raise ModelError(f"model.{key}", f"{family} models have no field {key!r}; "
                                             f"allowed: {', '.join(allowed)}")
        fields[key] = value
    if family == "gpt":
        fields.setdefault("attention", attention)
    if "routing" in allowed:
        fields.setdefault("routing", routing)  # token counts per expert: an input, not data
    if "max_seq_len" in allowed and "max_seq_len" not in overrides:
        # Positions (GPT's learned table, Llama's RoPE cache) sized to the training sequence.
        fields["max_seq_len"] = seq_len
    from simdist.models.fields import check_fields

    problem = check_fields(family, fields, overridden=set(overrides))
    if problem is not None:
        raise ModelError(f"model.{problem[0]}", problem[1])
    try:
        args = FAMILIES[family].args_cls(**fields)
    except TypeError as e:  # pragma: no cover - guarded by the field check above
        raise ModelError("model", str(e)) from None
    return ModelSpec(family=family, args=args)


def entrypoint_spec(entrypoint: str, kwargs: dict[str, Any]) -> ModelSpec:
    module, _, fn = entrypoint.partition(":")
    if not module or not fn:
        raise ModelError("model.entrypoint", f"expected 'package.module:function', got {entrypoint!r}")
    try:
        getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ModelError("model.entrypoint", f"cannot import {entrypoint!r}: {e}") from None
    return ModelSpec(family="custom", entrypoint=entrypoint, kwargs=dict(kwargs))


def build_model(spec: ModelSpec, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the model on `device` (meta by default: no memory, no data)."""
    with torch.device(device):
        if spec.entrypoint:
            module, _, fn = spec.entrypoint.partition(":")
            return getattr(importlib.import_module(module), fn)(**spec.kwargs)
        return FAMILIES[spec.family].model_cls(spec.args)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
