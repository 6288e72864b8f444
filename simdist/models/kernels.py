"""GPU-faithful kernel calls for fake execution.

Simulation runs on fake *cpu* tensors (training on fake cuda is impossible without a GPU), but
several CPU code paths differ from what the same PyTorch code does on a GPU: SDPA picks the CPU
flash kernel (no FLOP formula), RMSNorm decomposes into many small ops, dropout keeps a mask in
the activation dtype. These helpers call the aten ops that the CUDA dispatch would pick, so the
fake run records what a GPU would allocate and compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # On CUDA `F.rms_norm` dispatches to the fused kernel, which saves (input, rstd) only.
    return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)[0]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # On CUDA `F.dropout` uses the fused `native_dropout`, which saves a 1-byte bool mask.
    if not training or p == 0.0:
        return x
    return torch.ops.aten.native_dropout(x, p, True)[0]


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, dropout_p: float = 0.0
) -> torch.Tensor:
    """Flash attention over [batch, heads, seq, head_dim] inputs.

    The name matters: torch's context-parallel patch keys on a function called
    `scaled_dot_product_attention`.
    """
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, causal)
    return out[0]


__all__ = ["rms_norm", "dropout", "scaled_dot_product_attention", "F"]
