"""Roofline time of one kernel from its FLOPs and HBM bytes.

time = max(compute bound, memory bound, launch floor):
* matmul-class ops (mm, bmm, addmm, attention, conv) run on tensor cores at
  ``gpu.flops_for(dtype) * gpu.matmul_efficiency``;
* other ops (elementwise, norms, softmax, reductions, optimizer) run on the vector units at
  the fp32 peak -- in practice they are memory-bound, the fp32 term only matters for
  unusually FLOP-dense pointwise ops;
* the memory term is ``bytes / (hbm_bw * memory_efficiency)`` for both.

Launch floor: a CUDA kernel costs about 2-5 us of host launch overhead and a few us of
minimum on-device duration even when it does no work; in eager PyTorch tiny kernels are
bounded by this, not by the roofline. We use 2e-6 s per kernel, the low end (the GPU
pipelines launches while earlier kernels run, so the full host cost is often hidden).
Ops with zero FLOPs *and* zero bytes (views, metadata) launch no kernel and cost 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from simdist.costmodel.hardware import GPUSpec

__all__ = ["KERNEL_LAUNCH_FLOOR_S", "op_time", "op_times"]

KERNEL_LAUNCH_FLOOR_S = 2e-6


def op_time(
    flops: float, bytes_moved: float, gpu: GPUSpec, dtype: str = "bf16", is_matmul: bool = True
) -> float:
    """Seconds for one kernel doing ``flops`` FLOPs and moving ``bytes_moved`` HBM bytes."""
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes must be >= 0, got {flops}, {bytes_moved}")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    peak = gpu.flops_for(dtype) * gpu.matmul_efficiency if is_matmul else gpu.fp32_flops
    compute_s = flops / peak
    memory_s = bytes_moved / (gpu.hbm_bw * gpu.memory_efficiency)
    return max(compute_s, memory_s, KERNEL_LAUNCH_FLOOR_S)


def op_times(
    flops: Sequence[float],
    bytes: Sequence[float],  # noqa: A002 - name from the agreed API
    is_matmul: Sequence[bool],
    gpu: GPUSpec,
    dtype: str | Sequence[str] = "bf16",
) -> list[float]:
    """``op_time`` over columns of an op table; ``dtype`` is one name or one per op."""
    f = np.asarray(flops, dtype=np.float64)
    b = np.asarray(bytes, dtype=np.float64)
    mm = np.asarray(is_matmul, dtype=bool)
    if not (f.shape == b.shape == mm.shape) or f.ndim != 1:
        raise ValueError(f"flops, bytes and is_matmul must be 1-D and equal length: {f.shape}, {b.shape}, {mm.shape}")
    if (f < 0).any() or (b < 0).any():
        raise ValueError("flops and bytes must be >= 0")
    if isinstance(dtype, str):
        mm_peak = np.full(f.shape, gpu.flops_for(dtype))
    else:
        dtypes = list(dtype)
        if len(dtypes) != f.shape[0]:
            raise ValueError(f"dtype has {len(dtypes)} entries for {f.shape[0]} ops")
        peaks = {d: gpu.flops_for(d) for d in {d for d, m in zip(dtypes, mm) if m}}
        # non-matmul ops do not use the tensor-core peak; 1.0 is a placeholder never read
        mm_peak = np.array([peaks[d] if m else 1.0 for d, m in zip(dtypes, mm)], dtype=np.float64)
    peak = np.where(mm, mm_peak * gpu.matmul_efficiency, gpu.fp32_flops)
    t = np.maximum(np.maximum(f / peak, b / (gpu.hbm_bw * gpu.memory_efficiency)), KERNEL_LAUNCH_FLOOR_S)
    t[(f == 0) & (b == 0)] = 0.0
    return t.tolist()
