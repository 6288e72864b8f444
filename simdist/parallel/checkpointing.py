"""Activation checkpointing with torch's checkpoint wrapper (non-reentrant), per block."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    if mode != "full":
        raise NotImplementedError(f"activation_checkpointing={mode!r}")
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
