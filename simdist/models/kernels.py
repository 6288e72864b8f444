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


# RMSNorm. On CUDA `F.rms_norm` runs the fused `aten::_fused_rms_norm` kernel, whose autograd
# saves (input, rstd) and whose backward is `aten::_fused_rms_norm_backward`. A CPU build has only
# the composite form, which upcasts to fp32 and saves three fp32 copies. torch has no way to pick
# the CUDA kernel on a CPU build, so this custom op is ours: forward allocates what the CUDA
# kernel allocates (output, fp32 rstd), backward calls torch's own backward op.
@torch.library.custom_op("simdist::fused_rms_norm", mutates_args=())
def _fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    return out.clone(), rstd.clone()


@_fused_rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _rms_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _ = inputs
    ctx.save_for_backward(x, output[1], weight)


def _rms_backward(ctx, grad_out, _grad_rstd):  # noqa: ANN001, ANN202
    x, rstd, weight = ctx.saved_tensors
    gx, gw = torch.ops.aten._fused_rms_norm_backward(
        grad_out, x, [x.shape[-1]], rstd, weight, [True, True])
    return gx, gw, None


_fused_rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # the real thing, when there is a GPU (validation runs)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _fused_rms_norm(x, weight, eps)[0]


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
