"""CUDA semantics for any model on fake cpu tensors, at dispatch level.

Simulation runs on fake *cpu* tensors (FIELD-NOTES: training on fake cuda is impossible without
a GPU), and several aten ops pick a different implementation on a CPU tensor than on a CUDA one.
simdist's own models call the CUDA kernels directly (simdist/models/kernels.py); a third-party
model (Hugging Face, a user entrypoint) calls the public functions. While `cuda_semantics()` is
entered, those calls run what a CUDA build runs:

- `aten::scaled_dot_product_attention` (F.scaled_dot_product_attention): the CPU build picks
  `_scaled_dot_product_flash_attention_for_cpu` (no FLOP formula, CPU allocation pattern) or the
  math path (S x S matrices, e.g. whenever dropout_p > 0). Here CUDA's backend choice is made
  (torch's sdp_utils, default priority flash > mem-efficient > math): flash for fp16/bf16
  without a mask (GQA native, head_dim padded to a multiple of 8, at most 256); mem-efficient
  with a mask, or for fp32 (a boolean mask becomes an additive one first, as torch does); math
  otherwise (GQA with a mask). The CUDA ops have meta kernels, FLOP formulas and autograd, so the
  backward is theirs too (`_scaled_dot_product_flash_attention_backward`, ...).
- `aten::_fused_rms_norm` (what `F.rms_norm` / `nn.RMSNorm` call on every device): a CUDA kernel
  with its own backward on CUDA, a composite of ~10 ops (three fp32 copies saved) on CPU. Here:
  simdist's `simdist::fused_rms_norm`, which allocates and saves what the CUDA kernel does.
- `aten::dropout` (F.dropout, nn.Dropout): CUDA runs the fused `native_dropout` (a 1-byte bool
  mask saved); CPU a bernoulli mask in the activation dtype and a multiply.
- `aten::native_layer_norm` (nn.LayerNorm): the same op on both, but the CPU kernel returns mean
  and rstd in the input dtype, CUDA in fp32 (its accumulate type): saved for backward, so the
  stats are made fp32 (a dispatch mode entered below the recorders, which see the op's CUDA
  outputs).

The first three are kernels registered for the AutogradCPU key of the aten op (above autograd, so
the autograd graph is the CUDA op's own), removed again on exit; real (non-fake) tensors keep
their CPU implementation. What the model's own Python code does (Hugging Face's LlamaRMSNorm
computes in fp32 op by op) is what CUDA runs as well and is left alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from simdist.mode.flex_attention import flex_semantics
from simdist.mode.memory import fake_device_query, is_dtensor_dispatch, is_fake

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


# --- attention --------------------------------------------------------------------------------

def sdpa_backend(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                 is_causal: bool, enable_gqa: bool) -> str:
    """The kernel CUDA's SDPA picks for these inputs: flash | efficient | math."""
    d = q.shape[-1]
    gqa = q.shape[-3] != k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else False
    if gqa and not (enable_gqa and q.shape[-3] % k.shape[-3] == 0):
        return "math"  # torch raises for heads that differ without enable_gqa; math reports it
    causal_ok = not (is_causal and q.shape[-2] != k.shape[-2])
    if (q.dim() == 4 and q.dtype in _HALF and attn_mask is None and d <= 256 and causal_ok):
        return "flash"
    if q.dim() == 4 and not gqa and d % (8 if q.dtype in _HALF else 4) == 0 and causal_ok:
        return "efficient"
    return "math"


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,  # noqa: ANN001, ANN202
          scale=None, enable_gqa=False):
    if not is_fake(query):
        return aten.scaled_dot_product_attention.default.decompose(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    backend = sdpa_backend(query, key, attn_mask, is_causal, enable_gqa)
    if backend == "flash":
        d = query.shape[-1]
        scale = scale if scale is not None else 1.0 / math.sqrt(d)
        if d % 8:  # the CUDA path pads the head dim to a multiple of 8 (copies), then slices
            pad = 8 - d % 8
            query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        out = aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                       False, scale=scale)[0]
        return out[..., :d] if d % 8 else out
    if backend == "efficient":
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # torch's convert_boolean_attn_mask: 0 where attended, -inf elsewhere
            attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(query.dtype)
        if attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p,
                                                   is_causal, None, scale=scale,
                                                   enable_gqa=enable_gqa)[0]


# --- RMSNorm, dropout ----------------------------------------------------------------------------

def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: ANN001, ANN202
    from simdist.models.kernels import _fused_rms_norm as simdist_rms_norm

    if not is_fake(input) or weight is None or len(normalized_shape) != 1:
        return aten._fused_rms_norm.default.decompose(input, normalized_shape, weight, eps)
    if eps is None:  # the CUDA kernel's default: epsilon of the accumulate type
        eps = torch.finfo(torch.float32).eps
    return simdist_rms_norm(input, weight, float(eps))


def _dropout(input, p, train):  # noqa: ANN001, ANN202
    if is_fake(input) and train and 0 < p < 1 and input.numel() > 0:
        return aten.native_dropout(input, p, train)[0]  # CUDA's is_fused_kernel_acceptable
    return aten.dropout.default.decompose(input, p, train)


_KERNELS = {"scaled_dot_product_attention": _sdpa, "_fused_rms_norm": _fused_rms_norm,
            "dropout": _dropout}


# --- LayerNorm statistics ---------------------------------------------------------------------

class _FakeDispatch(TorchDispatchMode):
    """The mode just above FakeTensorMode, below the recorders (which see what it returns):
    native_layer_norm's mean and rstd in fp32 for half inputs, as the CUDA kernel returns them;
    and an op fake execution cannot run (data-dependent, no fake kernel) raised as
    simdist.errors.CannotSimulate naming the op and the module running it."""

    def __init__(self, ctx: Any = None) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if (device := fake_device_query(func, args)) is not None:
            return device
        if is_dtensor_dispatch(types):
            return NotImplemented
        try:
            out = func(*args, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - re-raised as it is unless fake execution's
            from simdist.errors import CannotSimulate, cannot_simulate

            if isinstance(e, CannotSimulate):
                raise
            named = cannot_simulate(e, str(func), self.ctx.module() if self.ctx else "")
            if named is None:
                raise
            raise named from e
        if func is aten.native_layer_norm.default and out[1].dtype != torch.float32 \
                and args[0].dtype in _HALF:
            y, mean, rstd = out
            shape = mean.shape
            del out, mean, rstd  # freed before the fp32 ones exist: live bytes never hold both
            return (y, y.new_empty(shape, dtype=torch.float32),
                    y.new_empty(shape, dtype=torch.float32))
        return out


@contextlib.contextmanager
def cuda_semantics(ctx: Any = None) -> Iterator[None]:
    """While inside: the aten ops above run as on CUDA for fake tensors (module docstring), and
    ops fake execution cannot run are named with the module of `ctx` (a StepContext). Enter it
    below (before) the recording modes."""
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - removed again on exit
    try:
        for name, fn in _KERNELS.items():
            lib.impl(name, fn, "AutogradCPU")
        # torch.compile regions (torchtitan compiles flex_attention and create_block_mask) run
        # eagerly: the recorders see every op (the cost model's `compile` prices fusion), and
        # dynamo refuses to trace under the recording modes.
        with torch.compiler.set_stance("force_eager"), flex_semantics(), _FakeDispatch(ctx):
            yield
    finally:
        lib._destroy()


__all__ = ["cuda_semantics", "sdpa_backend"]
