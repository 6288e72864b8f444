"""One registry of model families: a family is one registration (torchtitan's `TrainSpec`) —
its argument dataclass and model class, its parallelize function, whether it has a TP plan,
whether the layer memo may rebuild its blocks, and which of its modules call the attention
kernel (context parallelism swaps that call). Also the resolution
of a config's model section into a ModelSpec, and building it on meta."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from simdist.models import FLAVORS
from simdist.models.gpt import GPT, GPTArgs
from simdist.models.llama3 import Llama3, Llama3Args
from simdist.models.moe import MoEArgs, MoETransformer
from simdist.models.hf import HFArgs, HFError, build_hf, hf_spec_args
from simdist.parallel.blocks import DEFAULT_BLOCKS


def _parallelize(name: str) -> Callable[..., None]:
    """simdist.parallel.apply's `name`, imported at the first call: the planner reads this
    registry without importing torch.distributed's FSDP and DTensor (a second)."""
    def parallelize(model: nn.Module, mesh: Any, plan: Any) -> None:
        from simdist.parallel import apply

        getattr(apply, name)(model, mesh, plan)

    parallelize.__name__ = parallelize.__qualname__ = name
    return parallelize


parallelize_llama3, parallelize_gpt, parallelize_moe, parallelize_hf, parallelize_custom = (
    _parallelize(f"parallelize_{f}") for f in ("llama3", "gpt", "moe", "hf", "custom"))


@dataclass(frozen=True)
class Family:
    name: str
    args_cls: type | None  # None: a user entrypoint builds the model from its own kwargs
    model_cls: Callable[[Any], nn.Module] | None
    parallelize: Callable[..., None]  # (model, mesh, ParallelPlan) -> None, in place
    tensor_parallel: bool = False  # the family has a TP plan (parallel/tensor_parallel.py)
    # Every block is the same module type with the same config: the layer memo rebuilds deep
    # stages from short ones (MoE is not: dense first layers, routing per layer).
    layer_memo: bool = False
    # Modules that call simdist.models.kernels.scaled_dot_product_attention by name.
    attention_modules: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register(Family("llama3", Llama3Args, Llama3, parallelize_llama3, tensor_parallel=True,
                layer_memo=True, attention_modules=("simdist.models.llama3",)))
register(Family("gpt", GPTArgs, GPT, parallelize_gpt, tensor_parallel=True, layer_memo=True,
                attention_modules=("simdist.models.gpt",)))
register(Family("moe", MoEArgs, MoETransformer, parallelize_moe,
                attention_modules=("simdist.models.llama3",)))
# Hugging Face transformers from config (simdist/models/hf.py): TP from the model's own plan,
# FSDP2 and checkpointing per decoder block; the layer memo where the config's blocks are all
# the same (HFArgs.identical_blocks, checked when the config is resolved).
register(Family("hf", HFArgs, build_hf, parallelize_hf, tensor_parallel=True, layer_memo=True))
register(Family("custom", None, None, parallelize_custom))


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the family and its full argument dataclass (or a user entrypoint)."""

    family: str
    args: Any = None
    entrypoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    blocks: str | None = None  # entrypoints: path of the block container (default `layers`)
    inputs: str | None = None  # entrypoints: `module:function` giving the forward's kwargs

    @property
    def n_layers(self) -> int | None:
        return getattr(self.args, "n_layers", None)

    @property
    def registration(self) -> Family:
        return FAMILIES[self.family]

    @property
    def block_path(self) -> str:
        """Module path of the block container in the built model (module names in the
        recorded streams start with it): `layers`, an hf model's `hf.model.layers` /
        `hf.transformer.h`, an entrypoint's `blocks:`."""
        if self.entrypoint:
            return self.blocks or DEFAULT_BLOCKS
        return getattr(self.args, "block_path", DEFAULT_BLOCKS)

    @property
    def layer_memo(self) -> bool:
        """The layer memo may rebuild this model's depth from short steps: its family's blocks
        are all the same (an hf config: where they were found so, `identical_blocks`)."""
        return (self.registration.layer_memo and not self.entrypoint and bool(self.n_layers)
                and getattr(self.args, "identical_blocks", True))

    def with_layers(self, n_layers: int) -> ModelSpec:
        """The same model with `n_layers` blocks (the family rebuilds what follows the depth)."""
        args = self.args
        args = (args.with_layers(n_layers) if hasattr(args, "with_layers")
                else dataclasses.replace(args, n_layers=n_layers))
        return dataclasses.replace(self, args=args)


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


def hf_spec(hf: dict, *, attention: str = "flash") -> ModelSpec:
    """`model.hf` -> ModelSpec (transformers needed: a ModelError naming model.hf without)."""
    try:
        return ModelSpec(family="hf", args=hf_spec_args(hf, attention))
    except HFError as e:
        raise ModelError(e.key, str(e)) from None


def _import_function(key: str, name: str) -> Callable[..., Any]:
    module, _, fn = name.partition(":")
    if not module or not fn:
        raise ModelError(key, f"expected 'package.module:function', got {name!r}")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ModelError(key, f"cannot import {name!r}: {e}") from None


def entrypoint_spec(entrypoint: str, kwargs: dict[str, Any], blocks: str | None = None,
                    inputs: str | None = None) -> ModelSpec:
    _import_function("model.entrypoint", entrypoint)
    if inputs is not None:
        _import_function("model.inputs", inputs)
    return ModelSpec(family="custom", entrypoint=entrypoint, kwargs=dict(kwargs), blocks=blocks,
                     inputs=inputs)


def forward_inputs(spec: ModelSpec) -> Callable[..., dict[str, Any]] | None:
    """The model's `model.inputs` function, (model, batch, seq_len) -> the forward's keyword
    arguments besides the tokens; None where the model takes the tokens alone."""
    return _import_function("model.inputs", spec.inputs) if spec.inputs else None


_NORMALS = (torch.nn.init.normal_, torch.Tensor.normal_)


class _MetaNormalIsANoOp(torch.overrides.TorchFunctionMode):
    """`Tensor.normal_` on a meta tensor returns it: a meta tensor has no data to fill, and
    torch's reference normal_ imports torch._dynamo at its first call (a second and a half),
    which the planner and a warm run need nowhere else (embeddings initialise with it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _NORMALS:
            tensor = args[0] if args else kwargs.get("tensor")  # (init.normal_ by keyword)
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_model(spec: ModelSpec, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate the model on `device` (meta by default: no memory, no data)."""
    meta = torch.device(device).type == "meta"
    with torch.device(device), (_MetaNormalIsANoOp() if meta else contextlib.nullcontext()):
        if spec.entrypoint:
            module, _, fn = spec.entrypoint.partition(":")
            model = getattr(importlib.import_module(module), fn)(**spec.kwargs)
            if spec.blocks:
                model.simdist_blocks = spec.blocks  # read by simdist.parallel.blocks
            return model
        return FAMILIES[spec.family].model_cls(spec.args)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(spec: ModelSpec, seq_len: int,
                    model: nn.Module | None = None) -> dict[str, int]:
    """Model FLOPs per token in the published MFU conventions, from the model built on meta:
    torchtitan's 6*(N - N_embedding) + 12*L*H*Q*T and PaLM's 6*N + 12*L*H*Q*T (N parameters,
    L layers, H heads, Q head dim, T sequence length). Empty where the model has no such
    shape (a user model without n_layers / n_heads / dim). `model`: the spec built on meta,
    where the caller has it."""
    args = spec.args
    layers, heads, dim = (getattr(args, k, None) for k in ("n_layers", "n_heads", "dim"))
    if not (layers and heads and dim):
        return {}
    model = model if model is not None else build_model(spec, "meta")
    n = count_params(model)
    emb = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
              for p in m.parameters(recurse=False))
    attention = 12 * layers * heads * (dim // heads) * seq_len
    return {"torchtitan": 6 * (n - emb) + attention, "palm": 6 * n + attention}
