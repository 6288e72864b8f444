"""Kernel time per op class over the columns of an ops table (schema.OPS).

A row aggregates ``count`` identical launches: one launch is timed, then multiplied. Per launch:

* gemm (mm, addmm, bmm, baddbmm, _scaled_mm, linear, matmul): M, N, K (and batch) from the
  operand shapes; ``flops / (peak * gemm_ceiling * q)`` with q the tile and wave quantisation
  over the SMs: useful tiles / (waves * SMs), output tiles of the calibrated shape in either
  orientation (the better one, as cuBLAS' heuristics choose), K split over idle SMs when the
  output has fewer tiles than SMs (split-K). The roofline max with
  ``bytes / (hbm_bw * hbm_fraction)`` makes small GEMMs memory-bound.
* attention_fwd / attention_bwd (flash, memory-efficient, cuDNN SDPA kernels, FlexAttention's
  Triton kernels as simdist records them, mode/flex_attention.py):
  ``flops / (peak * attn_{fwd,bwd}_efficiency)``, same roofline.
* pointwise and memory (norms, softmax, reductions, copies, cat, embedding, anything not
  known): ``bytes / (hbm_bw * hbm_fraction)`` (or the fp32 vector peak if FLOP-bound).
* foreach (``_foreach_*``, ``_fused_adam*``): memory-bound, one launch per chunk of tensors as
  torch's multi_tensor_apply cuts them (chunks of 65536 elements, at most so many tensors and
  blocks per launch, by list depth).
* none (views, collectives, metadata): 0; collectives are timed by collectives.py.
Every launch costs at least ``launch_floor_s``. Peak FLOP/s follow the first operand's dtype,
``dtype`` where the shapes carry none.

``compile=True`` approximates torch.compile's fusion of pointwise chains: consecutive rows of
class pointwise with the same phase and module become one kernel that reads the first row's
inputs and writes the last row's outputs, launched as often as the most frequent row, its time
shared among the rows in proportion to their unfused times. Rows are in first-execution order,
so this is a rule over recorded order, not a data-flow analysis; norms and reductions stay
unfused (Inductor fuses some of them too), and nothing fuses into GEMMs (cuBLAS kernels).
"""

from __future__ import annotations

import math
from enum import Enum
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from simdist.costmodel.calibration import Calibration, default_calibration
from simdist.costmodel.hardware import GPUSpec

__all__ = ["OpClass", "gemm_dims", "gemm_quantisation", "foreach_launches", "kernel_times", "op_class"]


class OpClass(str, Enum):
    GEMM = "gemm"
    ATTENTION_FWD = "attention_fwd"
    ATTENTION_BWD = "attention_bwd"
    POINTWISE = "pointwise"
    MEMORY = "memory"
    FOREACH = "foreach"
    NONE = "none"


_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm", "linear", "matmul",
         "_addmm_activation", "_int_mm", "_grouped_mm", "_scaled_grouped_mm", "convolution",
         "_convolution", "convolution_backward"}
_ATTN = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
         "_flash_attention_forward", "_efficient_attention_forward",
         "_scaled_dot_product_flash_attention_for_cpu", "flex_attention"}
_ATTN_BWD = {a.removesuffix("_forward") + "_backward" for a in _ATTN}
_POINTWISE = {
    "add", "sub", "mul", "div", "neg", "abs", "exp", "log", "pow", "sqrt", "rsqrt", "reciprocal",
    "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu", "erf", "clamp", "clamp_min",
    "clamp_max", "where", "masked_fill", "maximum", "minimum", "lerp", "addcmul", "addcdiv",
    "sign", "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
    "logical_or", "logical_not", "bitwise_and", "bitwise_or", "_to_copy", "copy", "copy_", "clone",
    "native_dropout", "native_dropout_backward", "gelu_backward", "silu_backward",
    "sigmoid_backward", "tanh_backward", "threshold_backward", "hardtanh_backward", "fill",
    "fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
    "new_ones", "new_full", "rand", "randn", "randint", "bernoulli", "rand_like", "scalar_tensor",
}
_POINTWISE |= {p + "_" for p in list(_POINTWISE)}
_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided",
          "slice", "select", "unsqueeze", "squeeze", "alias", "detach", "split", "split_with_sizes",
          "chunk", "unbind", "narrow", "unfold", "view_as_real", "view_as_complex", "_reshape_alias",
          "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
          "set_", "resize_", "sym_size", "sym_stride", "sym_numel"}
_COMM_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "profiler",
                    "prim", "prims_comm"}
_NAMESPACES = _COMM_NAMESPACES | {"aten", "prims", "simdist", "fsdp"}


# The classes whose peak or launch count the loop in kernel_times reads from the shapes.
_SHAPE_PRICED = frozenset({OpClass.GEMM, OpClass.ATTENTION_FWD, OpClass.ATTENTION_BWD,
                           OpClass.FOREACH})


def _split(op: str) -> tuple[str, str]:
    """(namespace, name) of an op name as recorded ("mm", "aten.mm", "simdist.fused_rms_norm")."""
    parts = str(op).split(".")
    if len(parts) > 1 and parts[0] in _NAMESPACES:
        return parts[0], parts[1]
    return "", parts[0]


@lru_cache(maxsize=4096)
def op_class(op_name: str) -> OpClass:
    """The kernel class of an op name (see module doc)."""
    ns, name = _split(op_name)
    if ns in _COMM_NAMESPACES or name in _VIEWS:
        return OpClass.NONE
    if name in _GEMM:
        return OpClass.GEMM
    if name in _ATTN:
        return OpClass.ATTENTION_FWD
    if name in _ATTN_BWD:
        return OpClass.ATTENTION_BWD
    if name.startswith("_foreach_") or name.startswith("_fused_adam") or name.startswith("_fused_sgd"):
        return OpClass.FOREACH
    if name in _POINTWISE:
        return OpClass.POINTWISE
    return OpClass.MEMORY


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float64": 8,
             "double": 8, "int64": 8, "long": 8, "uint64": 8, "int32": 4, "uint32": 4, "int": 4,
             "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8,
             "complex128": 16}
_MATMUL_DTYPES = {"bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2",
                  "float8_e4m3fnuz", "float8_e5m2fnuz"}


@lru_cache(maxsize=65536)
def _parse(shapes: str) -> tuple[tuple[tuple[int, ...], str], ...]:
    out = []
    for item in filter(None, str(shapes).split(";")):
        dims, _, dt = item.partition(":")
        out.append((tuple(int(d) for d in dims.split("x")) if dims else (), dt))
    return tuple(out)


def _itemsize(dt: str) -> int:
    return 1 if dt.startswith("float8") else _ITEMSIZE.get(dt, 4)


def _input_bytes(shapes: str) -> int:
    return sum(math.prod(d) * _itemsize(dt) for d, dt in _parse(shapes))


def gemm_dims(op_name: str, shapes: str) -> tuple[int, int, int, int] | None:
    """(batch, M, N, K) of a GEMM row, or None where the shapes do not say."""
    _, name = _split(op_name)
    args = [d for d, _ in _parse(shapes)]
    if name in ("addmm", "baddbmm", "addbmm", "_addmm_activation"):
        args = args[1:]
    if len(args) < 2:
        return None
    a, b = args[0], args[1]
    if name == "linear":  # x [..., K], weight [N, K]
        if len(a) >= 1 and len(b) == 2 and a[-1] == b[1]:
            return 1, math.prod(a[:-1]), b[0], b[1]
        return None
    if len(a) >= 2 and len(b) >= 2 and a[-1] == b[-2]:
        return math.prod(a[:-2]), a[-2], b[-1], a[-1]
    return None


def gemm_quantisation(batch: int, m: int, n: int, sms: int, tile: tuple[int, int],
                      k: int = 0, splitk_min_k: int = 0) -> float:
    """Useful tiles / (waves * SMs), for the best of the CTA tiles cuBLAS chooses among: ``tile``
    in either orientation and the square tile of its short side (128 x 128, CUTLASS's default
    for bf16 on A100 / H100). With fewer tiles than SMs, K is split over up to SMs // tiles
    slices of at least ``splitk_min_k`` (cuBLAS / CUTLASS split-K); ``k = 0`` turns that off."""
    best = 0.0
    short = min(tile)
    for tm, tn in (tile, tile[::-1], (short, short)):
        tiles = batch * math.ceil(m / tm) * math.ceil(n / tn)
        split = 1
        if k and splitk_min_k and tiles < sms:
            split = max(1, min(sms // tiles, k // splitk_min_k))
        waves = math.ceil(tiles * split / sms)
        best = max(best, batch * m * n / (tm * tn) * split / (waves * sms))
    return min(best, 1.0)


def foreach_launches(op_name: str, shapes: str, chunk_elems: int, max_blocks: int,
                     max_tensors: Sequence[int]) -> int:
    """Kernel launches of one foreach call, cut as torch's multi_tensor_apply cuts them.

    The ``shapes`` of a foreach row list every tensor of every list argument. How many list
    arguments the op takes is read from its name (its overloads' schemas), and the row has
    that many lists if its shapes split into that many equal runs (else one: a Scalar or
    Tensor overload). Depth counts the lists plus the output list of an out-of-place op.
    ``max_tensors[d-1]`` is the tensor limit per launch at depth d."""
    _, name = _split(op_name)
    dims = [d for d, _ in _parse(shapes)]
    if not dims:
        return 1
    base = name.removeprefix("_foreach_").rstrip("_")
    lists = 1
    for k in range(_FOREACH_LISTS.get(base, 1), 1, -1):
        if len(dims) % k == 0:
            t = len(dims) // k
            if all(dims[i * t:(i + 1) * t] == dims[:t] for i in range(1, k)):
                lists = k
                break
    depth = min(5, lists + (0 if name.endswith("_") else 1))
    limit = max_tensors[depth - 1]
    launches = blocks = tensors = 0
    for d in dims[: len(dims) // lists]:
        chunks = math.ceil(math.prod(d) / chunk_elems)
        if chunks == 0:
            continue
        tensors += 1
        while chunks:
            take = min(chunks, max_blocks - blocks)
            blocks += take
            chunks -= take
            if blocks == max_blocks:  # block table full: launch; a split tensor carries over
                launches += 1
                blocks, tensors = 0, (1 if chunks else 0)
        if tensors == limit:
            launches += 1
            blocks = tensors = 0
    return launches + (1 if blocks else 0)


# list (Tensor[]) arguments of foreach / fused optimizer ops, most over their overloads
_FOREACH_LISTS = {"addcmul": 3, "addcdiv": 3, "lerp": 3, "add": 2, "sub": 2, "mul": 2, "div": 2,
                  "maximum": 2, "minimum": 2, "clamp_min": 2, "clamp_max": 2, "pow": 2, "copy": 2,
                  "_fused_adam": 4, "_fused_adamw": 4, "_fused_sgd": 3}

_COLUMNS = ("op", "phase", "module", "shapes", "count", "flops", "bytes")


def _columns(ops: pa.Table | Mapping[str, Sequence]) -> dict[str, list]:
    if isinstance(ops, pa.Table):
        missing = [c for c in _COLUMNS if c not in ops.column_names]
        get = lambda c: ops.column(c).to_pylist()  # noqa: E731
    else:
        missing = [c for c in _COLUMNS if c not in ops]
        get = lambda c: list(ops[c])  # noqa: E731
    if missing:
        raise ValueError(f"ops table lacks column(s) {', '.join(missing)}")
    cols = {c: get(c) for c in _COLUMNS}
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise ValueError(f"ops columns differ in length: {sorted(lengths)}")
    return cols


def kernel_times(ops: pa.Table | Mapping[str, Sequence], gpu: GPUSpec, calib: Calibration | None = None,
                 dtype: str = "bf16", *, compile: bool = False) -> np.ndarray:  # noqa: A002
    """Seconds per row (all ``count`` launches) of an ops table; see the module doc."""
    cal = calib or default_calibration()
    g = gpu.name
    c = _columns(ops)
    n = len(c["op"])
    count = np.asarray(c["count"], dtype=np.float64)
    flops = np.asarray(c["flops"], dtype=np.float64)
    nbytes = np.asarray(c["bytes"], dtype=np.float64)
    if (count < 0).any() or (flops < 0).any() or (nbytes < 0).any():
        raise ValueError("count, flops and bytes must be >= 0")
    safe = np.maximum(count, 1.0)
    f1, b1 = flops / safe, nbytes / safe  # one launch
    classes = [op_class(o) for o in c["op"]]
    floor = cal.launch_floor_s(g)
    mem_bw = gpu.hbm_bw * cal.hbm_fraction(g)
    default_peak = gpu.flops_for(dtype)

    peak = np.full(n, float(gpu.fp32_flops))  # vector units unless a matmul class says otherwise
    launches = np.ones(n)
    sms, tile, splitk = cal.sm_count(g), cal.gemm_tile(g), cal.gemm_splitk_min_k(g)
    # A row's peak and launches depend on its op and shapes alone: rows repeating them (the
    # same op of every layer) are priced from the first.
    priced: dict[tuple[str, str], int] = {}
    for i, (cls, op, shapes) in enumerate(zip(classes, c["op"], c["shapes"])):
        if cls not in _SHAPE_PRICED:
            continue
        first = priced.setdefault((op, shapes), i)
        if first != i:
            peak[i], launches[i] = peak[first], launches[first]
        elif cls in (OpClass.GEMM, OpClass.ATTENTION_FWD, OpClass.ATTENTION_BWD):
            parsed = _parse(shapes)
            dt = parsed[0][1] if parsed else ""
            p = gpu.flops_for(dt) if dt in _MATMUL_DTYPES else default_peak
            if cls is OpClass.GEMM:
                dims = gemm_dims(op, shapes)
                q = (gemm_quantisation(dims[0], dims[1], dims[2], sms, tile, dims[3], splitk)
                     if dims else 1.0)
                peak[i] = p * cal.gemm_ceiling(g) * q
            else:
                peak[i] = p * cal.attn_efficiency(g, cls is OpClass.ATTENTION_BWD)
        elif cls is OpClass.FOREACH:
            launches[i] = foreach_launches(
                op, shapes, cal.foreach_chunk_elems(g), cal.foreach_max_blocks(g),
                [cal.foreach_max_tensors(g, d) for d in range(1, 6)])

    t = np.maximum(np.maximum(f1 / peak, b1 / mem_bw), launches * floor)
    none = np.array([cls is OpClass.NONE for cls in classes], dtype=bool)
    t[none | ((f1 == 0) & (b1 == 0)) | (count == 0)] = 0.0
    out = t * count
    if compile:
        _fuse_pointwise(out, classes, c, count, f1, mem_bw, floor)
    return out


def _fuse_pointwise(out: np.ndarray, classes: list[OpClass], c: dict[str, list], count: np.ndarray,
                    f1: np.ndarray, mem_bw: float, floor: float) -> None:
    """In place: consecutive pointwise rows of one (phase, module) as one fused kernel."""
    n = len(classes)
    i = 0
    while i < n:
        j = i
        key = (c["phase"][i], c["module"][i])
        while (j < n and classes[j] is OpClass.POINTWISE and out[j] > 0
               and (c["phase"][j], c["module"][j]) == key):
            j += 1
        if j - i >= 2:
            first, last = i, j - 1
            read = _input_bytes(c["shapes"][first]) * count[first]
            per_launch_last = c["bytes"][last] / max(count[last], 1)
            write = max(0.0, per_launch_last - _input_bytes(c["shapes"][last])) * count[last]
            fused = max((read + write) / mem_bw, count[i:j].max() * floor)
            share = out[i:j] / out[i:j].sum()
            out[i:j] = fused * share
        i = max(j, i + 1)
