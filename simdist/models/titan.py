"""torchtitan's models as torchtitan builds them, for `model.entrypoint` (torchtitan installed:
`pip install -e '.[titan]'`, see pyproject). Nothing here changes a torchtitan class:

    model:
      entrypoint: simdist.models.titan:build       # kwargs: model, flavor, attn_backend, n_layers
      kwargs: {model: llama3, flavor: 8B}
      inputs: simdist.models.titan:trainer_inputs  # positions and masks, as torchtitan's trainer

`build` returns `torchtitan.models.<model>.model_registry(flavor, attn_backend).model.build()`,
the module torchtitan's trainer trains (its default attention: FlexAttention, which simdist runs
with CUDA semantics, mode/flex_attention.py). `trainer_inputs` gives the forward's extra
arguments as torchtitan's `Trainer.post_dataloading_process` does: `positions` from the data
loader (simdist's synthetic batch holds one document per sequence: 0..seq_len-1 in every row)
and `attention_masks = model.get_attention_masks(positions)` for flex / varlen attention.

The mask is built from real positions with the simulation's modes off and torch.compile in eager
stance (torchtitan compiles `create_block_mask`): its block tables are data, like a batch's
token ids, and hold the values the flex FLOP count reads (the causal blocks). On a GPU the
mask is a small compiled kernel per step; its time and memory are not recorded. Positions
enter the model (RoPE) as a fake tensor like the tokens.
"""

from __future__ import annotations

import importlib
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["build", "trainer_inputs"]


def build(model: str = "llama3", flavor: str = "debugmodel", attn_backend: str = "flex",
          n_layers: int | None = None) -> nn.Module:
    """torchtitan's `model` (a package under torchtitan.models) of `flavor`, built from its own
    registry config; `n_layers`: keep only the first n of the config's per-layer configs (a
    shorter model of the same shape)."""
    registry = importlib.import_module(f"torchtitan.models.{model}").model_registry
    config = registry(flavor, attn_backend=attn_backend).model
    if n_layers is not None:
        config.layers = config.layers[:n_layers]
    return config.build()


# model -> {(batch, seq_len): masks}: one mask per micro-batch shape (every micro-batch has the
# same positions), kept while the model lives.
_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _masks(model: nn.Module, batch: int, seq_len: int) -> Any:
    if not (type(batch) is int and type(seq_len) is int):
        # a symbolic size (simdist fit): the mask as the fake step's data, of symbolic shape
        # (no values: flex counts dense FLOPs, which that run does not record anyway)
        with torch.compiler.set_stance("force_eager"):
            return model.get_attention_masks(torch.arange(seq_len).expand(batch, seq_len))
    per_model = _MASKS.setdefault(model, {})
    if (batch, seq_len) not in per_model:
        with _disable_current_modes(), torch.compiler.set_stance("force_eager"):
            positions = torch.arange(seq_len).expand(batch, seq_len)
            per_model[batch, seq_len] = model.get_attention_masks(positions)
    return per_model[batch, seq_len]


def _uses_masks(model: nn.Module) -> bool:
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention

    first = getattr(getattr(model, "config", None), "first_attention", None)
    inner = getattr(first, "inner_attention", None)
    return isinstance(inner, (FlexAttention.Config, VarlenAttention.Config))


def trainer_inputs(model: nn.Module, batch: int, seq_len: int) -> dict[str, Any]:
    """The forward's keyword arguments besides the tokens, as torchtitan's trainer builds them
    (module doc). Called by the step inside the simulation's fake mode."""
    positions = torch.arange(seq_len).expand(batch, seq_len)  # fake, in the simulation
    inputs: dict[str, Any] = {"positions": positions}
    if _uses_masks(model):
        inputs["attention_masks"] = _masks(model, batch, seq_len)
    return inputs
