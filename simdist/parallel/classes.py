"""Exact rank equivalence classes.

Two ranks are in one class when nothing that can change their execution differs. For the
parallelisms built here that is each mesh coordinate's *execution signature*, computed from the
model and the plan rather than assumed:
- dp_shard: the local shard of every parameter. FSDP2 shards dim 0 with `torch.chunk`
  semantics (ceil-sized chunks, trailing ranks short or empty), so uneven dims give different
  shards at the tail of the group.
- pp: the stage (different layers). tp: shard shapes (even by validation) -> one signature.
- cp: ring attention's work per step depends on the cp rank (measured: --exhaustive shows
  different rows per cp rank), and FSDP shards over dp_shard x cp.
- dp_replicate: replicas run identical programs.
Per-dimension signatures are computed once per coordinate (not per rank), so 16k ranks cost
milliseconds."""

from __future__ import annotations

from collections.abc import Iterable

from simdist.layout import MESH_ORDER, MeshLayout


def chunk_size(n: int, parts: int, index: int) -> int:
    """Length of chunk `index` of `torch.chunk(range(n), parts)` (0 when it does not exist)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def dp_shard_signatures(dim0_sizes: Iterable[int], degree: int) -> list[tuple[int, ...]]:
    sizes = sorted(set(dim0_sizes))
    return [tuple(chunk_size(n, degree, i) for n in sizes) for i in range(degree)]


def rank_classes(layout: MeshLayout, dim0_by_stage: list[list[int]],
                 ep_loads: list[tuple] | None = None,
                 expert_dim0: Iterable[int] = ()) -> dict[tuple, list[int]]:
    """class signature -> ranks, in rank order; the first rank of each class represents it.
    `dim0_by_stage[p]`: dim-0 sizes of the parameters pipeline rank p holds (one list without
    pipelining); `ep_loads[e]`: the token counts EP rank e's experts receive (None without EP)."""
    keys = [_rank_keys(layout, sizes, ep_loads, expert_dim0) for sizes in dim0_by_stage]
    classes: dict[tuple, list[int]] = {}
    for rank in range(layout.world_size):
        coords = layout.coords(rank)
        key = (("pp", coords["pp"]),) + keys[coords["pp"]](coords)
        classes.setdefault(key, []).append(rank)
    return classes


def _rank_keys(layout: MeshLayout, sizes: list[int], ep_loads: list[tuple] | None,
               expert_dim0: Iterable[int]):  # noqa: ANN202
    sigs: dict[str, list] = {d: [0] * layout.degree(d) for d in MESH_ORDER}
    shard = layout.degree("dp_shard")
    sigs["dp_shard"] = dp_shard_signatures(sizes, shard)
    cp = layout.degree("cp")
    if cp > 1:
        # FSDP shards over dp_shard x cp (flattened, cp innermost): the shard a rank holds
        # depends on both coordinates.
        flat = dp_shard_signatures(sizes, shard * cp)
        sigs["dp_shard"] = [tuple(flat[c * cp + k] for k in range(cp)) for c in range(shard)]
        # ring attention's per-step work depends on the cp rank (which K/V blocks are masked)
        sigs["cp"] = list(range(cp))
    if layout.ep > 1:
        # dp_shard = dp_shard_mod_ep x ep: experts (local dim 0 = n_experts / ep) are
        # FSDP-sharded over dp_shard_mod_ep, and each EP rank receives its experts' tokens.
        mod = dp_shard_signatures(expert_dim0, shard // layout.ep)
        sigs["dp_shard"] = [(sigs["dp_shard"][c], mod[c // layout.ep], ep_loads[c % layout.ep])
                            for c in range(shard)]

    def key(coords: dict[str, int]) -> tuple:
        k = tuple((d, sigs[d][coords[d]]) for d in MESH_ORDER if d != "pp")
        if cp > 1:  # the FSDP shard of (dp_shard, cp) replaces the dp_shard signature
            k = tuple(kv for kv in k if kv[0] != "dp_shard") + (
                ("fsdp", sigs["dp_shard"][coords["dp_shard"]][coords["cp"]]),)
        return k

    return key
