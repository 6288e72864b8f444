"""Collective times: the NCCL-style model (``nccl_collective``, ``collective_times``) that
picks algorithm and protocol per message size. ``nbytes`` is the full buffer of one rank:
all-gather the output, reduce-scatter the input, all-reduce the tensor, all-to-all this rank's
input, send / recv the message.

NCCL-style model (``nccl_collective``, ``collective_times``)
-----------------------------------------------------------
For each (algorithm, protocol) NCCL can run, as its tuner does (src/graph/tuning.cc):

    time = scale * latency(alg, proto, hops) + factor(kind, n) * nbytes / busbw(alg, proto, level)

with ``factor`` the bus-bandwidth factor above (nccl-tests' busbw convention: 2(n-1)/n for
all_reduce, (n-1)/n for all_gather / reduce_scatter / all_to_all, 1 for broadcast and p2p),
and take the minimum. Latency: NCCL's base + per-hop constants, ring 2(n-1) steps for
all_reduce (n-1 for gather / scatter) of which 2(N-1) (N-1) cross nodes, tree 2((L-1)
intra + log2 N inter) hops, NVLS one switch round trip; ``scale`` is the measured ratio of
end-to-end to tuner latency (see the calibration table). Bandwidth, per GPU, nccl-tests busbw:
ring inside a node ``ring_busbw_fraction.nvlink`` x NVLink line rate; NVLS (one node, GPUs
with NVSwitch multicast) its own fraction; across nodes the group's L GPUs per node drive L
NICs (``ring_busbw_fraction.net`` of line rate) shared by ``nic_sharing`` concurrent groups.
Tree (all_reduce across nodes only) moves 2 x nbytes through each node's NICs against the
ring's 2(n-1)/n x nbytes. LL halves bandwidth (capped), LL128 keeps 0.92 and runs only over
NVLink by default. all_to_all and p2p send the off-node share of their bytes through the NIC
and the rest over NVLink, in parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from simdist.costmodel.calibration import Calibration, default_calibration
from simdist.costmodel.hardware import GPUSpec

__all__ = ["COLLECTIVE_KINDS", "CollectiveEstimate", "Placement", "collective_times",
           "nccl_collective"]

COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast",
                    "send", "recv")


# ------------------------------------------------------------------ NCCL-style model


class Placement(NamedTuple):
    """Where a group's ranks sit: ``local_size`` ranks on each of ``n_nodes`` nodes."""

    local_size: int
    n_nodes: int


@dataclass(frozen=True)
class CollectiveEstimate:
    time_s: float
    algorithm: str  # ring | tree | nvls | direct (all_to_all, p2p)
    protocol: str  # ll | ll128 | simple
    busbw: float  # bytes/s, nccl-tests convention (factor * nbytes / time)


class _Candidate(NamedTuple):
    algorithm: str
    protocol: str
    latency_s: float
    busbw: float  # bytes/s
    tree_correction: bool  # apply NCCL's size-dependent tree bandwidth correction


_BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0, "send": lambda n: 1.0, "recv": lambda n: 1.0,
}


def _gpu_key(gpu: GPUSpec) -> str:
    return gpu.name


def _candidates(kind: str, n: int, place: Placement, gpu: GPUSpec, cal: Calibration,
                nic_sharing: float) -> list[_Candidate]:
    g = _gpu_key(gpu)
    L, N = place
    level = "net" if N > 1 else "nvlink"
    intra = gpu.nvlink_bw * cal.ring_busbw_fraction(g, "nvlink")
    nic = gpu.internode_bw * cal.ring_busbw_fraction(g, "net") / nic_sharing  # per GPU
    ring_bw = min(intra, L * nic) if N > 1 else intra
    protos = [p for p in ("ll", "ll128", "simple") if p != "ll128" or cal.ll128_enabled(g, level)]

    def hop(lvl: str, alg: str, p: str) -> float:
        # NCCL: with one GPU per node, a ring's network hops are as exposed as a tree's
        if lvl == "net" and alg == "ring" and L == 1:
            alg = "tree"
        return cal.nccl_hop_latency_s(g, lvl, alg, p)

    def proto_bw(alg: str, p: str, bw: float) -> float:
        bw *= cal.proto_bw_fraction(g, alg, p)
        return min(bw, cal.ll_max_busbw(g, level)) if p == "ll" else bw

    out: list[_Candidate] = []
    if kind in ("all_reduce", "all_gather", "reduce_scatter"):
        steps, inter = (2 * (n - 1), 2 * (N - 1)) if kind == "all_reduce" else (n - 1, N - 1)
        for p in protos:
            lat = (cal.nccl_base_latency_s(g, "ring", p) + (steps - inter) * hop("nvlink", "ring", p)
                   + inter * hop("net", "ring", p))
            if kind == "all_reduce" and N > 1 and p == "simple":
                lat *= cal.nccl_ring_plateau(g)
            out.append(_Candidate("ring", p, lat, proto_bw("ring", p, ring_bw), False))
        if kind == "all_reduce" and N > 1:
            tree_bw = min(intra, L * nic * (n - 1) / n)  # 2 x nbytes per node vs the ring's 2(n-1)/n
            for p in protos:
                lat = cal.nccl_base_latency_s(g, "tree", p) + 2 * (
                    (L - 1) * hop("nvlink", "tree", p) + int(math.log2(N)) * hop("net", "tree", p))
                out.append(_Candidate("tree", p, lat, proto_bw("tree", p, tree_bw), True))
        nvls = cal.nvls_busbw_fraction(g, kind == "all_reduce")
        if N == 1 and nvls > 0:
            lat = cal.nccl_base_latency_s(g, "nvls", "simple") + hop("nvlink", "nvls", "simple")
            out.append(_Candidate("nvls", "simple", lat, gpu.nvlink_bw * nvls, False))
    elif kind == "broadcast":
        for p in protos:  # pipelined chain: one hop of latency (NCCL, same channels)
            lat = cal.nccl_base_latency_s(g, "ring", p) + hop(level, "ring", p)
            out.append(_Candidate("ring", p, lat, proto_bw("ring", p, ring_bw), False))
    else:  # all_to_all, send, recv: direct transfers, the off-node share through the NIC
        lat = cal.nccl_base_latency_s(g, "ring", "simple") + hop(level, "ring", "simple")
        if kind == "all_to_all":
            on, off = (L - 1) / (n - 1), (n - L) / (n - 1)  # shares of the (n-1)/n that move
        else:
            on, off = (0.0, 1.0) if N > 1 else (1.0, 0.0)
        # effective busbw: the slower of the parallel NVLink and NIC parts decides
        t_per_byte = max(on / intra, off / nic if off else 0.0)
        out.append(_Candidate("direct", "simple", lat, 1.0 / t_per_byte, False))
    return out


def _check_args(kind: str, group_size: int, place: Placement, nic_sharing: float) -> None:
    if kind not in _BUS_FACTOR:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
    L, N = place
    if group_size < 1 or L < 1 or N < 1 or L * N != group_size:
        raise ValueError(f"placement {tuple(place)} (local_size, n_nodes) must be >= 1 and multiply "
                         f"to group_size {group_size}")
    if not nic_sharing >= 1:
        raise ValueError(f"nic_sharing must be >= 1, got {nic_sharing}")


def _tree_corr(cal: Calibration, gpu: GPUSpec, protocol: str, nbytes: np.ndarray) -> np.ndarray:
    table = np.array([cal.tree_correction(_gpu_key(gpu), protocol, k) for k in range(64)])
    k = np.floor(np.log2(np.maximum(nbytes, 1.0))).astype(np.int64)
    return table[np.clip(k, 0, 63)]


def _times(kind: str, n: int, place: Placement, nbytes: np.ndarray, gpu: GPUSpec, cal: Calibration,
           nic_sharing: float) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per message and the index of the winning candidate."""
    cands = _candidates(kind, n, place, gpu, cal, nic_sharing)
    scale = cal.nccl_latency_scale(_gpu_key(gpu))
    factor = _BUS_FACTOR[kind](n)
    t = np.empty((len(cands), nbytes.size))
    for i, c in enumerate(cands):
        bw = c.busbw * (_tree_corr(cal, gpu, c.protocol, nbytes) if c.tree_correction else 1.0)
        t[i] = scale * c.latency_s + factor * nbytes / bw
    best = np.argmin(t, axis=0)
    out = t[best, np.arange(nbytes.size)]
    out[nbytes == 0] = 0.0
    return out, best


def nccl_collective(kind: str, nbytes: float, group_size: int, placement: Placement, gpu: GPUSpec,
                    calib: Calibration | None = None, *, nic_sharing: float = 1) -> CollectiveEstimate:
    """Time of one collective and the algorithm / protocol NCCL's tuner would pick."""
    cal = calib or default_calibration()
    place = Placement(*placement)
    _check_args(kind, group_size, place, nic_sharing)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if group_size == 1 or nbytes == 0:
        return CollectiveEstimate(0.0, "none", "none", 0.0)
    t, best = _times(kind, group_size, place, np.array([float(nbytes)]), gpu, cal, nic_sharing)
    c = _candidates(kind, group_size, place, gpu, cal, nic_sharing)[int(best[0])]
    return CollectiveEstimate(float(t[0]), c.algorithm, c.protocol,
                              _BUS_FACTOR[kind](group_size) * nbytes / float(t[0]))


def collective_times(kind: Sequence[str] | str, nbytes: Sequence[float], group_size: Sequence[int] | int,
                     local_size: Sequence[int] | int, n_nodes: Sequence[int] | int, gpu: GPUSpec,
                     calib: Calibration | None = None, *,
                     nic_sharing: Sequence[float] | float = 1) -> np.ndarray:
    """``nccl_collective`` time (seconds) over columns; scalars broadcast to the column length."""
    cal = calib or default_calibration()
    b = np.asarray(nbytes, dtype=np.float64)
    if b.ndim != 1:
        raise ValueError(f"nbytes must be 1-D, got shape {b.shape}")
    m = b.shape[0]

    def col(x, dt) -> np.ndarray:
        a = np.asarray(x, dtype=dt)
        if a.ndim == 0:
            a = np.full(m, a.item(), dtype=dt)
        if a.shape != (m,):
            raise ValueError(f"column of shape {a.shape} for {m} collectives")
        return a

    kinds = col(kind, object)
    n, L, N = col(group_size, np.int64), col(local_size, np.int64), col(n_nodes, np.int64)
    share = col(nic_sharing, np.float64)
    if (b < 0).any():
        raise ValueError("nbytes must be >= 0")
    out = np.zeros(m)
    keys = list(zip(kinds.tolist(), n.tolist(), L.tolist(), N.tolist(), share.tolist()))
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for (k, gs, ls, nn, sh), idx in groups.items():
        place = Placement(ls, nn)
        _check_args(k, gs, place, sh)
        if gs == 1:
            continue
        ix = np.array(idx)
        out[ix] = _times(k, gs, place, b[ix], gpu, cal, sh)[0]
    return out
