"""Cost rows: (op key, hardware profile) -> FLOPs, bytes read / written, estimated time.

The op key is a dispatch-cache `key_id`: one exact launch (op, overload, input metadata,
scalars). FLOPs and bytes follow the op counter's rule (simdist/opcount.py): views, metadata and
allocation ops move nothing and get no row; factories only write. `measured_time_s` stays null until a calibration
run on real hardware fills it.
"""

from __future__ import annotations

import time

import pyarrow as pa
import torch
from torch._subclasses import fake_tensor as ft
from torch.utils._pytree import tree_iter

from simdist.cache import schema as S
from simdist.cache.codec import TORCH_VERSION, Unencodable, meta_tensor, rebuild_args
from simdist.costmodel import GPUSpec, kernel_times
from simdist.opcount import bytes_read, kernel_flops, kernel_writes, shape_text, tensor_bytes


def _out_tensor(info: ft._DispatchCacheEntryOutputInfo, args: tuple) -> object:
    if info.inplace_idx is not None:
        return args[info.inplace_idx]
    md = info.metadata
    if md is None:
        return info.constant_value
    return torch.empty_strided(md.shape, md.stride, dtype=md.dtype, device="meta")


def cost_row(kid: str, key: ft._DispatchCacheKey, entry: object, gpu: GPUSpec,
             now: float | None = None) -> dict | None:
    """The cost row of one valid entry on `gpu`, or None where the op launches no kernel."""
    if not isinstance(entry, ft._DispatchCacheValidEntry):
        return None
    func = key.key[0]
    if not isinstance(func, torch._ops.OpOverload):
        return None
    try:
        args, kwargs = rebuild_args(key, meta_tensor)
        outs = [_out_tensor(i, args) for i in entry.output_infos]
    except (Unencodable, RuntimeError, TypeError, ValueError, IndexError):
        return None
    out = tuple(outs) if entry.is_output_tuple else outs[0]
    wrote_tensors = kernel_writes(func, args, kwargs, out)
    if wrote_tensors is None:
        return None
    try:
        flops = kernel_flops(func, args, kwargs, out)
    except Exception:  # a formula that cannot take these arguments: no row, never a guess
        return None
    wrote = tensor_bytes(wrote_tensors)
    read = bytes_read(func, args, kwargs)
    # One launch, timed by the kernel model the merge uses (costmodel/kernels.py).
    shapes = ";".join(shape_text(t) for t in tree_iter((args, kwargs))
                      if isinstance(t, torch.Tensor))
    op = str(func._overloadpacket).removeprefix("aten.")
    est = float(kernel_times({"op": [op], "phase": [""], "module": [""], "shapes": [shapes],
                              "count": [1], "flops": [flops], "bytes": [read + wrote]},
                             gpu)[0])
    return dict(key_id=kid, hardware=gpu.name, op=str(func._overloadpacket), flops=flops, bytes_read=read,
                bytes_written=wrote, est_time_s=est, measured_time_s=None,
                updated=time.time() if now is None else now)


def costs_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=S.costs_schema(TORCH_VERSION))
