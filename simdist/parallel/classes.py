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
Per-dimension signatures are computed once per coordinate (not per rank) and ranks grouped by
array operations, so 16k ranks cost milliseconds."""

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
    pipelining); `ep_loads[e]`: the token counts EP rank e's experts receive (None without EP).
    The signatures are computed per coordinate; ranks are grouped by array operations (one
    integer id per distinct signature, gathered by coordinates), linear in ranks."""
    import numpy as np

    world = layout.world_size
    coords = dict(zip(MESH_ORDER, np.unravel_index(np.arange(world), layout.degrees)))
    ids: dict[tuple, int] = {}  # signature -> id; signatures[id]
    signatures: list[tuple] = []

    def id_of(sig: tuple) -> int:
        if sig not in ids:
            ids[sig] = len(signatures)
            signatures.append(sig)
        return ids[sig]

    # rank key = (pp coordinate, then one signature per remaining dim), as ids; the tables are
    # per (stage, coordinate), so their size is the sum of the degrees, not the world
    pp = coords["pp"]
    columns = [pp]
    per_stage = [_coordinate_keys(layout, sizes, ep_loads, expert_dim0) for sizes in dim0_by_stage]
    for name in per_stage[0]:
        table = np.array([[id_of((name, sig)) for sig in stage[name]] for stage in per_stage])
        columns.append(table[pp, _coordinate(name, coords, layout)])
    keys = np.stack(columns, axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(first, kind="stable")  # classes by their first rank
    label = np.empty_like(order)
    label[order] = np.arange(len(order))
    by_rank = np.argsort(label[inverse], kind="stable")  # ranks grouped, rank order inside
    bounds = np.cumsum(np.bincount(label[inverse]))[:-1]
    classes: dict[tuple, list[int]] = {}
    for ranks in np.split(by_rank, bounds):
        row = keys[ranks[0]]
        key = (("pp", int(row[0])),) + tuple(signatures[i] for i in row[1:])
        classes[key] = ranks.tolist()
    return classes


def _coordinate(name: str, coords: dict, layout: MeshLayout):  # noqa: ANN202
    """Each rank's index into the signature table of key dim `name`."""
    if name == "fsdp":  # (dp_shard, cp) flattened, cp innermost
        return coords["dp_shard"] * layout.degree("cp") + coords["cp"]
    return coords[name]


def _coordinate_keys(layout: MeshLayout, sizes: list[int], ep_loads: list[tuple] | None,
                     expert_dim0: Iterable[int]) -> dict[str, list]:
    """Per key dim (every mesh dim but pp; with cp, the FSDP shard of (dp_shard, cp) replaces
    the dp_shard signature): the signature of each of its coordinates."""
    sigs: dict[str, list] = {d: [0] * layout.degree(d) for d in MESH_ORDER if d != "pp"}
    shard = layout.degree("dp_shard")
    sigs["dp_shard"] = dp_shard_signatures(sizes, shard)
    cp = layout.degree("cp")
    if cp > 1:
        # FSDP shards over dp_shard x cp (flattened, cp innermost): the shard a rank holds
        # depends on both coordinates.
        flat = dp_shard_signatures(sizes, shard * cp)
        # ring attention's per-step work depends on the cp rank (which K/V blocks are masked)
        sigs["cp"] = list(range(cp))
        if layout.ep > 1:  # (validation forbids cp with ep; kept exact anyway)
            raise ValueError("rank classes: cp with ep is not a plan simdist builds")
        del sigs["dp_shard"]
        sigs["fsdp"] = flat
    if layout.ep > 1:
        # dp_shard = dp_shard_mod_ep x ep: experts (local dim 0 = n_experts / ep) are
        # FSDP-sharded over dp_shard_mod_ep, and each EP rank receives its experts' tokens.
        mod = dp_shard_signatures(expert_dim0, shard // layout.ep)
        sigs["dp_shard"] = [(sigs["dp_shard"][c], mod[c // layout.ep], ep_loads[c % layout.ep])
                            for c in range(shard)]
    return sigs
