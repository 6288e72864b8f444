"""The logical device mesh as plain data: which coordinates a rank has, which ranks share a
group. Pure Python (no torch), so the coordinator can reason about 16k ranks cheaply; the
worker builds the matching torch DeviceMesh from the same layout."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

# torchtitan's order: pipeline outermost, tensor parallel innermost (inside a node).
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshLayout:
    degrees: tuple[int, ...]  # one per MESH_ORDER entry
    # Expert parallelism borrows the innermost `ep` coordinates of dp_shard (torchtitan):
    # dp_shard = dp_shard_mod_ep x ep, so it adds no factor to the world size.
    ep: int = 1

    @classmethod
    def from_parallel(cls, pp: int, dp_replicate: int, dp_shard: int, cp: int, tp: int,
                      ep: int = 1) -> "MeshLayout":
        return cls((pp, dp_replicate, dp_shard, cp, tp), ep)

    @property
    def world_size(self) -> int:
        return prod(self.degrees)

    def degree(self, dim: str) -> int:
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
