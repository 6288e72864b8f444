"""ClusterPlan: per-class traces merged into per-rank rows and a cluster summary with the cost
model; writers for the run directory (atomic: a failed run leaves nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from simdist import schema
from simdist.costmodel import GPUSpec, collective_time, combine, link_bw, mfu, op_times, pipeline_bubble
from simdist.trace import RankTrace
from simdist.layout import MESH_ORDER, MeshLayout

PHASES = ("fwd", "bwd", "optim")


@dataclass
class ClassCost:
    """Time of one class's step, for one placement of its groups (intra- vs inter-node)."""

    compute_by_phase: dict[str, float]
    comm_by_phase: dict[str, float]
    op_est: list[float]
    coll_est: list[float]


def class_compute(trace: RankTrace, gpu: GPUSpec, dtype: str) -> tuple[dict[str, float], list[float]]:
    ops = trace.ops
    counts = ops["count"].to_pylist()
    flops, nbytes = ops["flops"].to_pylist(), ops["bytes"].to_pylist()
    # Rows aggregate `count` identical launches: time one launch, multiply.
    per_launch = op_times([f / c for f, c in zip(flops, counts)], [b / c for b, c in zip(nbytes, counts)],
                          [f > 0 for f in flops], gpu, dtype)
    est = [t * c for t, c in zip(per_launch, counts)]
    by_phase = dict.fromkeys(PHASES, 0.0)
    for phase, t in zip(ops["phase"].to_pylist(), est):
        by_phase[phase] = by_phase.get(phase, 0.0) + t
    return by_phase, est


SPAN_DIMS = MESH_ORDER + ("ep", "dp_shard_mod_ep")


def span_signature(layout: MeshLayout, rank: int, gpus_per_node: int) -> tuple[bool, ...]:
    """Per mesh dim (SPAN_DIMS): does this rank's group along it stay inside one node?
    A group along one dim is an arithmetic progression of ranks: check its two ends."""
    coords = layout.coords(rank)
    strides: dict[str, int] = {}
    stride = 1
    for name, deg in zip(reversed(MESH_ORDER), reversed(layout.degrees)):
        strides[name] = stride
        stride *= deg

    def inside(offset: int, step: int, size: int) -> bool:
        lo = rank - offset * step
        return lo // gpus_per_node == (lo + (size - 1) * step) // gpus_per_node

    out = {name: inside(coords[name], strides[name], layout.degree(name)) for name in MESH_ORDER}
    # expert parallelism splits dp_shard into (dp_shard_mod_ep, ep), ep innermost
    ep, shard_stride = layout.ep, strides["dp_shard"]
    out["ep"] = inside(coords["ep"], shard_stride, ep)
    out["dp_shard_mod_ep"] = inside(coords["dp_shard"] // ep, shard_stride * ep,
                                    layout.degree("dp_shard") // ep)
    return tuple(out[name] for name in SPAN_DIMS)


def class_comm(trace: RankTrace, gpu: GPUSpec, intra: tuple[bool, ...]) -> tuple[dict[str, float], list[float]]:
    c = trace.collectives
    by_phase = dict.fromkeys(PHASES, 0.0)
    est = []
    for kind, dim, size, nbytes, phase, count in zip(
        c["kind"].to_pylist(), c["mesh_dim"].to_pylist(), c["group_size"].to_pylist(),
        c["bytes"].to_pylist(), c["phase"].to_pylist(), c["count"].to_pylist(),
    ):
        bw = link_bw(gpu, intra[SPAN_DIMS.index(dim)] if dim in SPAN_DIMS else False)
        t = collective_time(kind, nbytes, size, bw) * count
        est.append(t)
        by_phase[phase] = by_phase.get(phase, 0.0) + t
    return by_phase, est


@dataclass
class ClusterPlan:
    summary: dict[str, Any]
    ranks: pa.Table
    ops: pa.Table
    collectives: pa.Table
    memory: pa.Table
    traces: dict[int, RankTrace] = field(default_factory=dict, repr=False)

    @property
    def fits(self) -> bool:
        return bool(self.summary["fits"])

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write the run directory atomically: build it beside the target, then rename. Only a
        new path, an empty directory or a previous run directory is replaced (simdist.rundir);
        anything else raises ConfigError before a file is written."""
        from simdist.rundir import check_out

        out = check_out(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            # mkdtemp makes the directory private (0700); a run directory gets the permissions
            # of an ordinary mkdir, so that others sharing the filesystem can read the results.
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)
            (tmp / "plan.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            pq.write_table(self.ranks, tmp / "ranks.parquet")
            pq.write_table(self.ops, tmp / "ops.parquet")
            pq.write_table(self.collectives, tmp / "collectives.parquet")
            pq.write_table(self.memory, tmp / "memory.parquet")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                os.replace(out, old / out.name)
                try:
                    os.replace(tmp, out)
                except BaseException:  # put the previous run back rather than lose it
                    os.replace(old / out.name, out)
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def _with_class(table: pa.Table, class_id: int, extra: dict[str, list] | None = None) -> pa.Table:
    cols = {"class_id": pa.array([class_id] * table.num_rows, pa.int32())}
    cols.update({n: table[n] for n in table.column_names})
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values, pa.float64())
    return pa.table(cols)


def merge(
    *,
    layout: MeshLayout,
    classes: list[list[int]],
    traces: list[RankTrace],
    gpu: GPUSpec,
    gpus_per_node: int,
    dtype: str,
    summary: dict[str, Any],
    tokens_per_step: int,
    memory_limit_bytes: int,
    pp_schedule: str = "1f1b",
    pp_virtual_stages: int = 1,
    num_microbatches: int = 1,
) -> ClusterPlan:
    """Per-class traces -> per-rank rows (class numbers + the rank's own placement) + summary."""
    compute = [class_compute(tr, gpu, dtype) for tr in traces]
    comm_cache: dict[tuple[int, tuple[bool, ...]], tuple[dict[str, float], list[float]]] = {}
    rows: list[dict] = []
    for cid, (ranks, tr) in enumerate(zip(classes, traces)):
        compute_by_phase = compute[cid][0]
        for rank in ranks:
            sig = span_signature(layout, rank, gpus_per_node)
            if (cid, sig) not in comm_cache:
                comm_cache[(cid, sig)] = class_comm(tr, gpu, sig)
            comm_by_phase = comm_cache[(cid, sig)][0]
            bubble = pipeline_bubble(
                compute_by_phase.get("fwd", 0.0) + compute_by_phase.get("bwd", 0.0),
                layout.degree("pp"), pp_virtual_stages, num_microbatches, pp_schedule)
            st = combine(compute_by_phase, comm_by_phase, bubble_s=bubble)
            coords = layout.coords(rank)
            rows.append(dict(
                rank=rank, node=rank // gpus_per_node, local_rank=rank % gpus_per_node,
                **coords, class_id=cid,
                peak_bytes=tr.peak_bytes, param_bytes=tr.param_bytes, grad_bytes=tr.grad_bytes,
                optimizer_bytes=tr.optimizer_bytes, activation_bytes=tr.activation_bytes,
                other_bytes=tr.other_bytes, flops=tr.flops, hbm_bytes=tr.hbm_bytes,
                comm_bytes=tr.comm_bytes, compute_s=st.compute_s, comm_s=st.comm_s,
                exposed_comm_s=st.exposed_comm_s, bubble_s=st.bubble_s, step_s=st.step_s,
                fits=tr.peak_bytes <= memory_limit_bytes,
            ))
    rows.sort(key=lambda r: r["rank"])
    ranks_table = schema.table(schema.RANKS, rows)

    # Class-level tables carry the time of the class's representative placement.
    ops_t, coll_t, mem_t = [], [], []
    for cid, (ranks, tr) in enumerate(zip(classes, traces)):
        sig = span_signature(layout, ranks[0], gpus_per_node)
        coll_est = comm_cache[(cid, sig)][1]
        ops_t.append(_with_class(tr.ops, cid, {"est_time_s": compute[cid][1]}))
        coll_t.append(_with_class(tr.collectives, cid, {"est_time_s": coll_est}))
        mem_t.append(_with_class(tr.memory, cid))

    step_s = max(r["step_s"] for r in rows)
    model_flops = sum(len(ranks) * tr.model_flops for ranks, tr in zip(classes, traces))
    peak_rank = max(rows, key=lambda r: (r["peak_bytes"], -r["rank"]))
    summary = dict(summary)
    world = layout.world_size
    summary.update(
        world_size=world,
        fits=all(r["fits"] for r in rows),
        peak_bytes_max=peak_rank["peak_bytes"],
        peak_rank=peak_rank["rank"],
        memory_limit_bytes=memory_limit_bytes,
        step_time_s=step_s,
        mfu=mfu(model_flops, world, step_s, gpu.flops_for(dtype)),
        mfu_convention="model FLOPs = 3 x executed forward FLOPs (torchtitan: 6*N_non-embedding + 12*L*H*Q*T per token)",
        tokens_per_s=tokens_per_step / step_s,
        tokens_per_s_per_gpu=tokens_per_step / step_s / world,
        model_flops_per_step=model_flops,
        rank_classes=len(classes),
        simulated_ranks=len(traces),
    )
    return ClusterPlan(
        summary=summary,
        ranks=ranks_table,
        ops=pa.concat_tables(ops_t).cast(schema.OPS_OUT),
        collectives=pa.concat_tables(coll_t).cast(schema.COLLECTIVES_OUT),
        memory=pa.concat_tables(mem_t).cast(schema.MEMORY_OUT),
        traces=dict(enumerate(traces)),
    )
