"""The logical device mesh as plain data (simdist's `ParallelDims`): every mesh dimension, the
derived ones too, named once; which coordinates a rank has; which ranks share a group and
whether that group stays inside one node. Pure Python (no torch), so the planner and the merge
reason about 16k ranks cheaply; the worker builds the matching torch DeviceMesh from it."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

# torchtitan's order: pipeline outermost, tensor parallel innermost (inside a node).
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Expert parallelism splits dp_shard into (dp_shard_mod_ep, ep), ep innermost (torchtitan).
EP_DIMS = ("dp_shard_mod_ep", "ep")
# FSDP with context parallelism shards over dp_shard x cp flattened (torchtitan's name).
DP_SHARD_CP = "dp_shard_cp"
# A rank's coordinates as the run directory's tables carry them.
COORD_DIMS = MESH_ORDER + ("ep",)
# Every dim a recorded collective can name, derived ones included.
GROUP_DIMS = MESH_ORDER + EP_DIMS + (DP_SHARD_CP,)


@dataclass(frozen=True)
class MeshLayout:
    degrees: tuple[int, ...]  # one per MESH_ORDER entry
    # Expert parallelism borrows the innermost `ep` coordinates of dp_shard (torchtitan):
    # dp_shard = dp_shard_mod_ep x ep, so it adds no factor to the world size.
    ep: int = 1

    @classmethod
    def from_parallel(cls, pp: int, dp_replicate: int, dp_shard: int, cp: int, tp: int,
                      ep: int = 1) -> MeshLayout:
        return cls((pp, dp_replicate, dp_shard, cp, tp), ep)

    @property
    def world_size(self) -> int:
        return prod(self.degrees)

    def degree(self, dim: str) -> int:
        if dim == "ep":
            return self.ep
        if dim == "dp_shard_mod_ep":
            return self.degree("dp_shard") // self.ep
        if dim == DP_SHARD_CP:
            return self.degree("dp_shard") * self.degree("cp")
        return self.degrees[MESH_ORDER.index(dim)]

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for name, deg in zip(reversed(MESH_ORDER), reversed(self.degrees)):
            out[name] = rank % deg
            rank //= deg
        out = {name: out[name] for name in MESH_ORDER}
        out["ep"] = out["dp_shard"] % self.ep
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0  # (an "ep" entry is part of dp_shard and ignored)
        for name, deg in zip(MESH_ORDER, self.degrees):
            rank = rank * deg + coords[name]
        return rank

    def strides(self) -> dict[str, int]:
        """Rank distance between neighbours along each MESH_ORDER dim."""
        out: dict[str, int] = {}
        stride = 1
        for name, deg in zip(reversed(MESH_ORDER), reversed(self.degrees)):
            out[name] = stride
            stride *= deg
        return out


def group_placements(layout: MeshLayout, gpus_per_node: int) -> dict[str, tuple]:
    """Per dim of GROUP_DIMS (and "world"): for every rank, (ranks of its group on its busiest
    node, nodes its group spans), as two int arrays over ranks. Each group is counted once:
    linear in ranks whatever the group sizes."""
    import numpy as np

    world = layout.world_size
    ranks = np.arange(world)
    coords = dict(zip(MESH_ORDER, np.unravel_index(ranks, layout.degrees)))
    strides = layout.strides()
    node = ranks // gpus_per_node
    ep = layout.ep
    shard = coords["dp_shard"]
    zeroed = {d: ranks - coords[d] * strides[d] for d in MESH_ORDER}
    zeroed[DP_SHARD_CP] = ranks - shard * strides["dp_shard"] - coords["cp"] * strides["cp"]
    zeroed["ep"] = ranks - (shard % ep) * strides["dp_shard"]
    zeroed["dp_shard_mod_ep"] = ranks - (shard // ep) * ep * strides["dp_shard"]
    zeroed["world"] = np.zeros(world, dtype=ranks.dtype)
    out = {}
    for dim, group in zeroed.items():
        pair = group.astype(np.int64) * (world // gpus_per_node + 1) + node
        uniq, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
        g_of_pair = uniq // (world // gpus_per_node + 1)
        g_ids, g_inv = np.unique(g_of_pair, return_inverse=True)
        n_nodes = np.bincount(g_inv)
        local = np.zeros(len(g_ids), dtype=np.int64)
        np.maximum.at(local, g_inv, counts)
        rank_group = g_inv[inverse]
        out[dim] = (local[rank_group], n_nodes[rank_group])
    return out
