"""Bandwidth model of collectives: ring algorithms (what NCCL uses for large messages).

A ring of n ranks moves each byte over (n-1)/n of the ring per phase. With ``nbytes`` the
size of the full buffer on one rank and ``bw`` the per-GPU unidirectional link bandwidth:

    all_gather      (n-1)/n * nbytes / bw    nbytes = output (gathered) size
    reduce_scatter  (n-1)/n * nbytes / bw    nbytes = input (unscattered) size
    all_reduce     2(n-1)/n * nbytes / bw    nbytes = tensor size (RS + AG)
    all_to_all      (n-1)/n * nbytes / bw    nbytes = this rank's total input
    broadcast               nbytes / bw      pipelined chain (bandwidth-optimal)
    send / recv             nbytes / bw      nbytes = message

plus a per-step latency (alpha) term: every ring step waits on the previous one, so the
ring collectives pay (n-1) * latency_s, all_reduce 2(n-1) * latency_s (it is two rings:
reduce-scatter then all-gather), send/recv one latency_s. 5 us is the order of NCCL's
per-step latency over NVLink/IB. Tree algorithms (log n latency) win only for small
messages; not modelled yet.

Hierarchical topologies are reduced to one bottleneck bandwidth per group: NVLink if the
whole group is inside one node, otherwise the NIC (per GPU), see ``group_link_bw``.
"""

from __future__ import annotations

from typing import Sequence

from simdist.costmodel.hardware import GPUSpec

__all__ = ["COLLECTIVE_KINDS", "collective_time", "group_link_bw", "link_bw"]

# kind -> (bandwidth factor as a function of n, number of latency steps as a function of n)
_MODEL = {
    "all_gather": (lambda n: (n - 1) / n, lambda n: n - 1),
    "reduce_scatter": (lambda n: (n - 1) / n, lambda n: n - 1),
    "all_reduce": (lambda n: 2 * (n - 1) / n, lambda n: 2 * (n - 1)),
    "all_to_all": (lambda n: (n - 1) / n, lambda n: n - 1),
    "broadcast": (lambda n: 1.0, lambda n: n - 1),
    "send": (lambda n: 1.0, lambda n: 1),
    "recv": (lambda n: 1.0, lambda n: 1),
}
COLLECTIVE_KINDS = tuple(_MODEL)


def collective_time(
    kind: str, nbytes: float, group_size: int, link_bw: float, *, latency_s: float = 5e-6
) -> float:
    """Seconds for one collective of ``kind`` on ``group_size`` ranks (see module doc)."""
    if kind not in _MODEL:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if nbytes < 0 or link_bw <= 0 or latency_s < 0:
        raise ValueError(f"need nbytes >= 0, link_bw > 0, latency_s >= 0; got {nbytes}, {link_bw}, {latency_s}")
    if group_size == 1:
        return 0.0
    bw_factor, steps = _MODEL[kind]
    n = group_size
    return bw_factor(n) * nbytes / link_bw + steps(n) * latency_s


def link_bw(gpu: GPUSpec, intra_node: bool) -> float:
    """Effective per-GPU bandwidth (bytes/s): NVLink inside one node, else the NIC."""
    return (gpu.nvlink_bw if intra_node else gpu.internode_bw) * gpu.link_efficiency


def group_link_bw(gpu: GPUSpec, ranks: Sequence[int], gpus_per_node: int) -> float:
    """Effective per-GPU bandwidth (bytes/s) of a group: NVLink within one node, else the NIC."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks must not be empty")
    return link_bw(gpu, len({r // gpus_per_node for r in ranks}) == 1)
