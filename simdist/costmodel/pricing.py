"""Prices of one class's recorded rows: seconds per launch of every op row (the kernel model)
and per call of every collective row for one placement of its groups (the NCCL model), plus
the compute slowdown each collective causes; and the event durations of its kernel stream."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from simdist.costmodel.calibration import Calibration
from simdist.costmodel.collectives import Placement, collective_times
from simdist.costmodel.hardware import GPUSpec
from simdist.costmodel.kernels import kernel_times

__all__ = ["collective_call_times", "event_durations", "op_launch_times"]


def op_launch_times(ops: pa.Table, gpu: GPUSpec, calib: Calibration, dtype: str,
                    compile: bool = False) -> np.ndarray:
    """Seconds of one launch of every op row (rows aggregate `count` identical launches)."""
    total = kernel_times(ops, gpu, calib, dtype, compile=compile)
    count = np.maximum(np.asarray(ops["count"].to_numpy(zero_copy_only=False), np.float64), 1.0)
    return total / count


def collective_call_times(colls: pa.Table, placement: Callable[[str], Placement],
                          gpu: GPUSpec, calib: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """(seconds of one call, slowdown of compute beside it) of every collective row, its group
    placed by `placement(mesh_dim)`. Point-to-point rows are placed as a pair of ranks, inside
    one node when their pipeline group is."""
    n = colls.num_rows
    if n == 0:
        return np.zeros(0), np.ones(0)
    kinds = colls["kind"].to_pylist()
    dims = colls["mesh_dim"].to_pylist()
    sizes = colls["group_size"].to_pylist()
    places = [placement(d) for d in dims]
    local, nodes, group = [], [], []
    for k, p, size in zip(kinds, places, sizes):
        if k in ("send", "recv"):
            inside = p.n_nodes == 1
            local.append(2 if inside else 1)
            nodes.append(1 if inside else 2)
            group.append(2)
        else:
            local.append(min(p.local_size, size))
            nodes.append(p.n_nodes)
            group.append(size)
    t = collective_times(kinds, colls["bytes"].to_pylist(), group, local, nodes, gpu, calib)
    g = gpu.name
    slow = np.array([calib.comm_slowdown(g, "net" if nn > 1 else "nvlink") for nn in nodes])
    return np.asarray(t, np.float64), slow


def event_durations(kernels: pa.Table, op_t: np.ndarray, coll_t: np.ndarray,
                    coll_slow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(duration, slowdown) of every kernel-stream event: ops and collectives priced by their
    rows, marks 0 / 1."""
    kind = np.asarray(kernels["kind"].to_pylist(), dtype=object)
    row = kernels["row"].to_numpy()
    dur = np.zeros(len(kind))
    slow = np.ones(len(kind))
    is_op, is_coll = kind == "op", kind == "coll"
    dur[is_op] = op_t[row[is_op]]
    dur[is_coll] = coll_t[row[is_coll]]
    slow[is_coll] = coll_slow[row[is_coll]]
    return dur, slow
