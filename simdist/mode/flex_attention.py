"""FlexAttention (torch.nn.attention.flex_attention) with CUDA semantics on fake cpu tensors.

On a CPU build `flex_attention` refuses inputs that require grad ("FlexAttention does not
support backward on CPU", `_validate_device`), and its higher-order op would otherwise run the
dense math reference (S x S score matrices). On CUDA torch.compile lowers it to one Triton
kernel per direction (torch/_inductor/kernel/flex/flex_attention.py), which allocates:

- forward: `out` in the query's dtype with the query's stride order, `logsumexp` and
  `max_scores` in fp32 (B, Hq, Lq); for backward q, k, v, out and logsumexp are kept, what the
  backward kernel reads (torch's eager autograd function, FlexAttentionAutogradOp, saves
  max_scores too, but compiled, as torchtitan runs it, AOT autograd's partitioner keeps only
  what the backward graph uses, and max_scores dies with the forward unless asked for);
- backward: `delta` = rowsum(out * grad_out) in fp32 (B, Hq, Lq), then grad_query,
  grad_key and grad_value (B, Hkv, Lkv, d), with the strides of q, k and v.

While `flex_semantics()` is entered, the op's Autograd kernel is replaced, for fake inputs,
by an autograd function over two simdist custom ops that allocate exactly that (real tensors
keep torch's kernel), and the CPU device check lets fake tensors through (they stand for CUDA
ones). The score_mod is not traced (it changes no shape); one capturing tensors that require
grad (a learned bias) is refused, since its gradient is not modelled.

FLOPs: the kernel computes every block the BlockMask lists (partial and full blocks, a
partial block in full, its masked entries set to -inf), so the counted work is the attended
area: the sum over batch, query heads and query blocks of the listed key blocks' areas, read
from the mask's `kv_num_blocks`/`kv_indices` (and their `full_` twins) where the mask holds
real values (built from real positions, e.g. simdist.models.titan). A mask built on fake
tensors has no values: then the dense area is counted, an upper bound, and a warning says so.
Per attended (query, key) entry: forward 2*(d_qk + d_v) (Q K^T and P V, as torch's SDPA
formula), backward 2*(3*d_qk + 2*d_v) (Q K^T recomputed, dO V^T, P^T dO, dS K, dS^T Q).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.attention.flex_attention as flex_api
from torch._C import DispatchKey
from torch._higher_order_ops.flex_attention import _permute_strides, flex_attention as flex_hop
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import register_flop_formula

from simdist.mode.memory import is_fake

__all__ = ["flex_semantics", "attended_area", "DENSE"]

# `attended` when the mask's values are unknown (a mask on fake tensors): count the dense area.
DENSE = -1


# --- the kernels: what the Triton kernels allocate ---------------------------------------------

@torch.library.custom_op("simdist::flex_attention", mutates_args=())
def _flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attended: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("simdist::flex_attention stands for the CUDA kernel on fake "
                              "tensors only")


@_flex_forward.register_fake
def _(q, k, v, attended):  # noqa: ANN001, ANN202
    b, hq, lq, _ = q.shape
    out = _permute_strides(q.new_empty((b, hq, lq, v.shape[-1])), q.stride())
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse, q.new_empty((b, hq, lq), dtype=torch.float32)


@torch.library.custom_op("simdist::flex_attention_backward", mutates_args=())
def _flex_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, grad_out: torch.Tensor, attended: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("simdist::flex_attention_backward stands for the CUDA kernel on "
                              "fake tensors only")


@_flex_backward.register_fake
def _(q, k, v, out, lse, grad_out, attended):  # noqa: ANN001, ANN202
    bq, hq, lq, dqk = q.shape
    _, hkv, lkv, dv = v.shape
    delta = q.new_empty((bq, hq, lq), dtype=torch.float32)
    dq = _permute_strides(q.new_empty(q.shape), q.stride())
    dk = _permute_strides(k.new_empty((bq, hkv, lkv, dqk)), k.stride())
    dvv = _permute_strides(v.new_empty((bq, hkv, lkv, dv)), v.stride())
    return dq, dk, dvv, delta


def _area(q_shape: Any, k_shape: Any, attended: int) -> int:
    b, hq, lq, _ = q_shape
    return b * hq * lq * k_shape[-2] if attended == DENSE else attended


@register_flop_formula(torch.ops.simdist.flex_attention)
def _flex_forward_flops(q_shape, k_shape, v_shape, attended, *args, out_shape=None,  # noqa: ANN001
                        **kwargs) -> int:
    return 2 * _area(q_shape, k_shape, attended) * (q_shape[-1] + v_shape[-1])


@register_flop_formula(torch.ops.simdist.flex_attention_backward)
def _flex_backward_flops(q_shape, k_shape, v_shape, *args, out_shape=None,  # noqa: ANN001
                         **kwargs) -> int:
    attended = args[-1]
    return 2 * _area(q_shape, k_shape, attended) * (3 * q_shape[-1] + 2 * v_shape[-1])


# --- the attended area from the BlockMask -------------------------------------------------------

def attended_area(block_mask: tuple, q_shape: torch.Size, kv_len: int) -> int:
    """(query, key) entries the kernel computes, summed over batch and query heads: every block
    `kv_indices` lists (partial and full), clipped at the sequence ends; DENSE where the mask's
    tensors are fake. `block_mask`: BlockMask.as_tuple()."""
    _q_len, _kv_len, kv_num, kv_idx, full_num, full_idx, *_rest = block_mask
    q_block, kv_block = _rest[-3], _rest[-2]
    if (q_block, kv_block) == (flex_api._LARGE_SPARSE_BLOCK_SIZE,) * 2:
        return DENSE  # no block_mask given: flex_attention's one all-attending block
    tensors = [t for t in (kv_num, kv_idx, full_num, full_idx) if t is not None]
    if any(is_fake(t) for t in tensors):
        warnings.warn("flex_attention: the BlockMask was built on fake tensors, so its "
                      "sparsity is unknown; FLOPs count the dense area (an upper bound)",
                      stacklevel=3)
        return DENSE
    b, hq, lq, _ = q_shape
    with _disable_current_modes():  # the mask's own values, not ops of the simulated program
        return _listed_area(((kv_num, kv_idx), (full_num, full_idx)), b, hq, lq, kv_len,
                            q_block, kv_block)


def _listed_area(pairs: tuple, b: int, hq: int, lq: int, kv_len: int, q_block: int,
                 kv_block: int) -> int:
    area = 0
    for num, idx in pairs:
        if num is None:
            continue
        listed = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)  # [Bm, Hm, Qb, KVb]
        cols = (kv_len - idx.long() * kv_block).clamp(0, kv_block)
        q_starts = torch.arange(idx.shape[-2]) * q_block
        rows = (lq - q_starts).clamp(0, q_block).view(1, 1, -1, 1)
        per_mask = int((listed * cols * rows).sum())
        area += per_mask * (b // num.shape[0]) * (hq // num.shape[1])
    return area


# --- the op's autograd, on fake inputs ------------------------------------------------------------

class _FlexAttentionCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # noqa: ANN205
                attended: int):
        out, lse, max_scores = torch.ops.simdist.flex_attention(q, k, v, attended)
        ctx.attended = attended
        ctx.mark_non_differentiable(max_scores)
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse, max_scores

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any, _grad_max: Any):  # noqa: ANN205
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, delta = torch.ops.simdist.flex_attention_backward(
            q, k, v, out, lse, grad_out, ctx.attended)
        del delta
        return dq, dk, dv, None


def _autograd_kernel(original: Any) -> Any:
    def flex_attention_autograd(query, key, value, score_mod, block_mask, scale,  # noqa: ANN001, ANN202
                                kernel_options, score_mod_other_buffers=(),
                                mask_mod_other_buffers=()):
        if not is_fake(query):
            return original(query, key, value, score_mod, block_mask, scale, kernel_options,
                            score_mod_other_buffers, mask_mod_other_buffers)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in score_mod_other_buffers):
            raise NotImplementedError("flex_attention with a score_mod capturing tensors that "
                                      "require grad: its gradient is not simulated")
        attended = attended_area(block_mask, query.shape, key.shape[-2])
        return _FlexAttentionCUDA.apply(query, key, value, attended)

    return flex_attention_autograd


def _validate_device_cuda(original: Any) -> Any:
    def validate_device(query, key, value):  # noqa: ANN001, ANN202
        if is_fake(query):
            return None  # a fake tensor stands for a CUDA one, where backward is supported
        return original(query, key, value)

    return validate_device


@contextlib.contextmanager
def flex_semantics() -> Iterator[None]:
    """While inside: flex_attention on fake tensors runs as the CUDA kernels (module doc)."""
    kernel = flex_hop.py_kernels[DispatchKey.Autograd]
    validate = flex_api._validate_device
    flex_hop.py_kernels[DispatchKey.Autograd] = _autograd_kernel(kernel)
    flex_hop._dispatch_cache.clear()
    flex_api._validate_device = _validate_device_cuda(validate)
    try:
        with warnings.catch_warnings():
            # torch warns that eager flex_attention materialises the scores: not so here, the
            # kernels above stand for the compiled one.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        flex_hop.py_kernels[DispatchKey.Autograd] = kernel
        flex_hop._dispatch_cache.clear()
        flex_api._validate_device = validate
