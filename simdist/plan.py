"""ClusterPlan: per-class traces merged into per-rank rows and a cluster summary: every class's
kernel stream replayed by the event simulation (costmodel/step_sim.py) for each placement of
its groups, pipelines replayed across their stages; writers for the run directory (atomic: a
failed run leaves nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simdist import schema
from simdist.costmodel import Calibration, mfu
from simdist.costmodel.collectives import Placement
from simdist.costmodel.pricing import collective_call_times, event_durations, op_launch_times
from simdist.costmodel.step_sim import StepResult, pipeline_makespan, simulate_step
from simdist.layout import group_placements
from simdist.trace import RankTrace

if TYPE_CHECKING:
    from simdist.planner import RunPlan


@dataclass
class ClusterPlan:
    summary: dict[str, Any]
    ranks: pa.Table
    ops: pa.Table
    collectives: pa.Table
    memory: pa.Table
    kernels: pa.Table
    timeline: dict = field(default_factory=dict, repr=False)  # Chrome trace event format
    traces: dict[int, RankTrace] = field(default_factory=dict, repr=False)

    @property
    def fits(self) -> bool:
        return bool(self.summary["fits"])

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def write(self, out_dir: str | os.PathLike, report: bool = True) -> Path:
        """Write the run directory atomically: build it beside the target, then rename. Only a
        new path, an empty directory or a previous run directory is replaced (simdist.rundir);
        anything else raises ConfigError before a file is written. `report`: also build
        report.html from the files just written (simdist.report; a failure there is a warning,
        not a lost run); a sweep writes one page for all its plans instead."""
        from simdist.rundir import check_out, install, staging_dir

        out = check_out(out_dir)
        tmp = staging_dir(out)
        try:
            (tmp / "plan.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            pq.write_table(self.ranks, tmp / "ranks.parquet")
            pq.write_table(self.ops, tmp / "ops.parquet")
            pq.write_table(self.collectives, tmp / "collectives.parquet")
            pq.write_table(self.memory, tmp / "memory.parquet")
            pq.write_table(self.kernels, tmp / "kernels.parquet")
            (tmp / "timeline.json").write_text(json.dumps(self.timeline) + "\n")
            if report:
                from simdist.report import RunDir, write_report_or_warn

                write_report_or_warn(RunDir(tmp))
            return install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _with_class(table: pa.Table, class_id: int, extra: dict[str, list] | None = None) -> pa.Table:
    cols = {"class_id": pa.array([class_id] * table.num_rows, pa.int32())}
    cols.update({n: table[n] for n in table.column_names})
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values, pa.float64())
    return pa.table(cols)


@dataclass
class _Placed:
    """One class simulated for one placement of its groups."""
    class_id: int
    result: StepResult
    durations: np.ndarray
    slowdown: np.ndarray
    coll_t: np.ndarray


def merge(run: RunPlan, traces: list[RankTrace], summary: dict[str, Any],
          calib: Calibration) -> ClusterPlan:
    """Per-class traces -> per-rank rows (each rank's own placement) + summary."""
    cfg, layout, gpu = run.cfg, run.layout, run.gpu
    gpn = cfg.cluster.gpus_per_node
    world = layout.world_size
    places = group_placements(layout, gpn)
    class_of = np.zeros(world, dtype=np.int64)
    for cid, ranks in enumerate(run.classes):
        class_of[ranks] = cid

    # Every class's rows priced once; each distinct placement of its groups simulated once.
    op_t = [op_launch_times(tr.ops, gpu, calib, cfg.training.dtype, cfg.training.compile)
            for tr in traces]
    placed: dict[tuple, _Placed] = {}
    key_of = [None] * world
    for cid, (ranks, tr) in enumerate(zip(run.classes, traces)):
        dims = sorted(set(tr.collectives["mesh_dim"].to_pylist()))
        r = np.asarray(ranks)
        sig = (np.stack([places[d][0][r] for d in dims] + [places[d][1][r] for d in dims], 1)
               if dims else np.zeros((len(r), 0), np.int64))
        uniq, inverse = np.unique(sig, axis=0, return_inverse=True)
        for u, row in enumerate(uniq):
            key = (cid, tuple(row.tolist()))
            where = {d: Placement(int(row[k]), int(row[len(dims) + k])) for k, d in enumerate(dims)}
            coll_t, slow = collective_call_times(tr.collectives, where.__getitem__, gpu, calib)
            dur, sl = event_durations(tr.kernels, op_t[cid], coll_t, slow)
            k = tr.kernels
            res = simulate_step(k["kind"].to_pylist(), k["phase"].to_pylist(),
                                k["stream"].to_pylist(), k["wait"].to_pylist(),
                                k["weight"].to_pylist(), k["label"].to_pylist(), dur, sl)
            placed[key] = _Placed(cid, res, dur, sl, coll_t)
        for idx, rank in zip(np.asarray(inverse).reshape(-1), ranks):
            key_of[rank] = (cid, tuple(uniq[idx].tolist()))

    step, bubble = _pipelines(run, placed, key_of, traces)
    rows = _rank_rows(run, traces, placed, key_of, class_of, step, bubble, gpn)
    ranks_table = schema.table(schema.RANKS, rows)

    # Class-level tables carry the time of the class's binding (slowest) rank's placement.
    ops_t, coll_t, mem_t, ker_t, binding = [], [], [], [], []
    for cid, (ranks, tr) in enumerate(zip(run.classes, traces)):
        rank = max(ranks, key=lambda q: (step[q], -q))
        binding.append(rank)
        p = placed[key_of[rank]]
        count = tr.ops["count"].to_numpy(zero_copy_only=False)
        ops_t.append(_with_class(tr.ops, cid, {"est_time_s": (op_t[cid] * count).tolist()}))
        calls = tr.collectives["count"].to_numpy(zero_copy_only=False)
        coll_t.append(_with_class(tr.collectives, cid, {"est_time_s": (p.coll_t * calls).tolist()}))
        mem_t.append(_with_class(tr.memory, cid))
        ker_t.append(_with_class(tr.kernels, cid, {"est_time_s": p.durations.tolist()}))

    step_s = float(max(r["step_s"] for r in rows))
    slowest = max(rows, key=lambda r: (r["step_s"], -r["rank"]))
    model_flops = sum(len(ranks) * tr.model_flops for ranks, tr in zip(run.classes, traces))
    executed = sum(len(ranks) * tr.flops for ranks, tr in zip(run.classes, traces))
    peak_rank = max(rows, key=lambda r: (r["peak_bytes"], -r["rank"]))
    t = cfg.training
    tokens = t.global_batch * t.seq_len
    peak_flops = gpu.flops_for(t.dtype)
    summary = dict(summary)
    per_token = summary.pop("flops_per_token", {})
    summary.update(
        world_size=world,
        fits=all(r["fits"] for r in rows),
        peak_bytes_max=peak_rank["peak_bytes"],
        peak_rank=peak_rank["rank"],
        memory_limit_bytes=run.memory_limit_bytes,
        step_time_s=step_s,
        mfu=mfu(model_flops, world, step_s, peak_flops),
        mfu_convention="model FLOPs = 3 x the executed forward FLOPs (no recompute; attention "
                       "as torch's flash formula counts it, causal mask not discounted)",
        mfu_torchtitan=(mfu(per_token["torchtitan"] * tokens, world, step_s, peak_flops)
                        if "torchtitan" in per_token else None),
        mfu_palm=(mfu(per_token["palm"] * tokens, world, step_s, peak_flops)
                  if "palm" in per_token else None),
        mfu_conventions={"mfu_torchtitan": "6*(N - N_embedding) + 12*L*H*Q*T per token",
                         "mfu_palm": "6*N + 12*L*H*Q*T per token (PaLM; torchtitan before 2025)"},
        hfu=mfu(executed, world, step_s, peak_flops),
        tokens_per_s=tokens / step_s,
        tokens_per_s_per_gpu=tokens / step_s / world,
        model_flops_per_step=model_flops,
        rank_classes=len(run.classes),
        simulated_ranks=len(traces),
        time_breakdown=dict(rank=slowest["rank"], compute_s=slowest["compute_s"],
                            comm_s=slowest["comm_s"], exposed_comm_s=slowest["exposed_comm_s"],
                            bubble_s=slowest["bubble_s"], step_s=slowest["step_s"]),
        bottleneck=_bottleneck(slowest, placed[key_of[slowest["rank"]]].result, places,
                               slowest["rank"]),
        calibration=cfg.cluster.calibration or "built-in defaults (simdist/costmodel/calibration.py)",
    )
    if cfg.cluster.price_per_gpu_hour is not None:
        summary["cost_per_million_tokens"] = (cfg.cluster.price_per_gpu_hour * world / 3600
                                              * step_s / tokens * 1e6)
    timeline = _timeline(run, traces, placed, key_of, binding)
    return ClusterPlan(
        summary=summary,
        ranks=ranks_table,
        ops=pa.concat_tables(ops_t).cast(schema.OPS_OUT),
        collectives=pa.concat_tables(coll_t).cast(schema.COLLECTIVES_OUT),
        memory=pa.concat_tables(mem_t).cast(schema.MEMORY_OUT),
        kernels=pa.concat_tables(ker_t).cast(schema.KERNELS_OUT),
        timeline=timeline,
        traces=dict(enumerate(traces)),
    )


def _pipelines(run: RunPlan, placed: dict[tuple, _Placed], key_of: list,
               traces: list[RankTrace]) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's step and bubble seconds: its own simulation, or without pipelining; with
    it, the makespan of its pipeline (the ranks that differ only in their pp coordinate)
    replayed across stages, once per distinct pipeline."""
    layout = run.layout
    world = layout.world_size
    step = np.array([placed[key_of[r]].result.step_s for r in range(world)])
    bubble = np.zeros(world)
    pp = layout.degree("pp")
    if pp == 1:
        return step, bubble
    stride = layout.strides()["pp"]
    done: dict[tuple, dict[int, tuple[float, float]]] = {}
    for first in range(stride):  # the pp-0 rank of every pipeline
        members = [first + p * stride for p in range(pp)]
        key = tuple(key_of[m] for m in members)
        if key not in done:
            acts, pre, post = {}, {}, {}
            for p, m in enumerate(members):
                res = placed[key_of[m]].result
                acts[p] = res.actions
                pre[p] = res.actions[0].start if res.actions else 0.0
                post[p] = res.step_s - (res.actions[-1].end if res.actions else 0.0)
            done[key] = pipeline_makespan(acts, pre, post, run.cfg.parallel.stages)
        for p, m in enumerate(members):
            step[m], bubble[m] = done[key][p]
    return step, bubble


def _rank_rows(run: RunPlan, traces: list[RankTrace], placed: dict[tuple, _Placed],
               key_of: list, class_of: np.ndarray, step: np.ndarray, bubble: np.ndarray,
               gpn: int) -> list[dict]:
    layout = run.layout
    rows = []
    limit = run.memory_limit_bytes
    for rank in range(layout.world_size):
        cid = int(class_of[rank])
        tr = traces[cid]
        res = placed[key_of[rank]].result
        rows.append(dict(
            rank=rank, node=rank // gpn, local_rank=rank % gpn, **layout.coords(rank),
            class_id=cid,
            peak_bytes=tr.peak_bytes, param_bytes=tr.param_bytes, grad_bytes=tr.grad_bytes,
            optimizer_bytes=tr.optimizer_bytes, activation_bytes=tr.activation_bytes,
            other_bytes=tr.other_bytes, flops=tr.flops, hbm_bytes=tr.hbm_bytes,
            comm_bytes=tr.comm_bytes, compute_s=res.compute_s, comm_s=res.comm_s,
            exposed_comm_s=res.exposed_comm_s, bubble_s=float(bubble[rank]),
            step_s=float(step[rank]), fits=tr.peak_bytes <= limit,
        ))
    return rows


def _bottleneck(row: dict, res: StepResult, places: dict, rank: int) -> str:
    """What the slowest rank's step waits on, in words."""
    step = row["step_s"]
    if step <= 0:
        return "idle"
    if row["bubble_s"] > max(row["exposed_comm_s"], 0.1 * step):
        return f"pipeline bubble: {100 * row['bubble_s'] / step:.0f}% of the step idle"
    if res.exposed_by_stream and row["exposed_comm_s"] > 0.1 * step:
        dim, secs = max(res.exposed_by_stream.items(), key=lambda kv: kv[1])
        link = ("the NIC" if dim in places and places[dim][1][rank] > 1 else "NVLink")
        return (f"comm-bound: {dim} collectives over {link}, "
                f"{100 * row['exposed_comm_s'] / step:.0f}% of the step exposed")
    return f"compute-bound: {100 * row['compute_s'] / step:.0f}% of the step computing"


def _timeline(run: RunPlan, traces: list[RankTrace], placed: dict[tuple, _Placed],
              key_of: list, binding: list[int]) -> dict:
    """Chrome trace event format (Perfetto, chrome://tracing): the simulated step of each
    class's binding rank, one process per class, one thread per stream; consecutive events of
    one module and phase on one stream are one span."""
    events: list[dict] = []
    for cid, (rank, tr) in enumerate(zip(binding, traces)):
        p = placed[key_of[rank]]
        k = tr.kernels
        res = simulate_step(k["kind"].to_pylist(), k["phase"].to_pylist(),
                            k["stream"].to_pylist(), k["wait"].to_pylist(),
                            k["weight"].to_pylist(), k["label"].to_pylist(), p.durations,
                            p.slowdown, keep_spans=True)
        modules, phases = k["module"].to_pylist(), k["phase"].to_pylist()
        events.append({"name": "process_name", "ph": "M", "ts": 0, "dur": 0, "pid": cid,
                       "tid": 0, "args": {"name": f"class {cid} (rank {rank})"}})
        streams: dict[str, int] = {}
        last: dict[str, dict] = {}
        for span in res.spans or []:
            tid = streams.setdefault(span.stream, len(streams))
            name = modules[span.index] or "(root)"
            ts, dur = span.start * 1e6, (span.end - span.start) * 1e6
            prev = last.get(span.stream)
            if (prev is not None and prev["name"] == name and prev["cat"] == phases[span.index]
                    and abs(prev["ts"] + prev["dur"] - ts) < 1e-6):
                prev["dur"] = ts + dur - prev["ts"]
                continue
            ev = {"name": name, "cat": phases[span.index], "ph": "X", "ts": ts, "dur": dur,
                  "pid": cid, "tid": tid}
            events.append(ev)
            last[span.stream] = ev
        for s, tid in streams.items():
            events.append({"name": "thread_name", "ph": "M", "ts": 0, "dur": 0, "pid": cid,
                           "tid": tid, "args": {"name": s}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
