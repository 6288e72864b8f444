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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from simdist import schema
from simdist.costmodel import Calibration, mfu
from simdist.costmodel.collectives import Placement
from simdist.costmodel.pricing import collective_call_times, event_durations, op_launch_times
from simdist.costmodel.step_sim import StepResult, pipeline_makespan, simulate_step
from simdist.layout import COORD_DIMS, MESH_ORDER, group_placements
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
            # compact, and no cycle check (plain dicts and lists): 10^5 spans for a deep
            # pipeline's classes
            (tmp / "timeline.json").write_text(json.dumps(
                self.timeline, separators=(",", ":"), check_circular=False) + "\n")
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
    placed: list[_Placed] = []
    place_of = np.zeros(world, dtype=np.int64)  # each rank's entry of `placed`
    for cid, (ranks, tr) in enumerate(zip(run.classes, traces)):
        dims = sorted(set(tr.collectives["mesh_dim"].to_pylist()))
        r = np.asarray(ranks)
        sig = (np.stack([places[d][0][r] for d in dims] + [places[d][1][r] for d in dims], 1)
               if dims else np.zeros((len(r), 0), np.int64))
        uniq, inverse = np.unique(sig, axis=0, return_inverse=True)
        place_of[r] = len(placed) + np.asarray(inverse).reshape(-1)
        kern = tr.kernels
        columns = [kern[c].to_pylist() for c in ("kind", "phase", "stream", "wait", "weight",
                                                 "label")]
        for row in uniq:
            where = {d: Placement(int(row[k]), int(row[len(dims) + k])) for k, d in enumerate(dims)}
            coll_t, slow = collective_call_times(tr.collectives, where.__getitem__, gpu, calib)
            dur, sl = event_durations(tr.kernels, op_t[cid], coll_t, slow)
            # One placement (the usual case: every rank of the class places its groups alike)
            # is the binding rank's: keep its spans for timeline.json instead of simulating
            # it a second time.
            res = simulate_step(*columns, dur, sl, keep_spans=len(uniq) == 1)
            placed.append(_Placed(cid, res, dur, sl, coll_t))

    step, bubble = _pipelines(run, placed, place_of)
    ranks_table = _rank_table(run, traces, placed, place_of, class_of, step, bubble, gpn)

    # Class-level tables carry the time of the class's binding (slowest) rank's placement.
    ops_t, coll_t, mem_t, ker_t, binding = [], [], [], [], []
    for cid, (ranks, tr) in enumerate(zip(run.classes, traces)):
        r = np.asarray(ranks)  # in rank order: argmax takes the lowest of equally slow ranks
        rank = int(r[np.argmax(step[r])])
        binding.append(rank)
        p = placed[place_of[rank]]
        count = tr.ops["count"].to_numpy(zero_copy_only=False)
        ops_t.append(_with_class(tr.ops, cid, {"est_time_s": (op_t[cid] * count).tolist()}))
        calls = tr.collectives["count"].to_numpy(zero_copy_only=False)
        coll_t.append(_with_class(tr.collectives, cid, {"est_time_s": (p.coll_t * calls).tolist()}))
        mem_t.append(_with_class(tr.memory, cid))
        ker_t.append(_with_class(tr.kernels, cid, {"est_time_s": p.durations.tolist()}))

    # the slowest and the fullest rank: the first of the maxima (the lowest rank among ties)
    slowest = _row(ranks_table, int(np.argmax(step)))
    peak_rank = _row(ranks_table, int(np.argmax(ranks_table["peak_bytes"].to_numpy())))
    step_s = float(step.max())
    model_flops = sum(len(ranks) * tr.model_flops for ranks, tr in zip(run.classes, traces))
    executed = sum(len(ranks) * tr.flops for ranks, tr in zip(run.classes, traces))
    t = cfg.training
    tokens = t.global_batch * t.seq_len
    peak_flops = gpu.flops_for(t.dtype)
    summary = dict(summary)
    per_token = summary.pop("flops_per_token", {})
    summary.update(
        world_size=world,
        fits=bool(pc.all(ranks_table["fits"]).as_py()),
        peak_bytes_max=peak_rank["peak_bytes"],
        peak_rank=peak_rank["rank"],
        memory_limit_bytes=run.memory_limit_bytes,
        step_time_s=step_s,
        mfu=mfu(model_flops, world, step_s, peak_flops),
        mfu_convention="model FLOPs = 3 x the executed forward FLOPs (no recompute; attention "
                       "as torch's flash formula counts it, causal mask not discounted; "
                       "flex_attention: the blocks its mask lists)",
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
        bottleneck=_bottleneck(slowest, placed[place_of[slowest["rank"]]].result, places,
                               slowest["rank"]),
        calibration=cfg.cluster.calibration or "built-in defaults (simdist/costmodel/calibration.py)",
    )
    if cfg.cluster.price_per_gpu_hour is not None:
        summary["cost_per_million_tokens"] = (cfg.cluster.price_per_gpu_hour * world / 3600
                                              * step_s / tokens * 1e6)
    timeline = _timeline(traces, placed, place_of, binding)
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


def _pipelines(run: RunPlan, placed: list[_Placed],
               place_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's step and bubble seconds: its own simulation, or without pipelining; with
    it, the makespan of its pipeline (the ranks that differ only in their pp coordinate)
    replayed across stages, once per distinct pipeline (its stages' placements)."""
    layout = run.layout
    step = np.array([p.result.step_s for p in placed])[place_of]
    bubble = np.zeros(layout.world_size)
    pp = layout.degree("pp")
    if pp == 1:
        return step, bubble
    stride = layout.strides()["pp"]
    # members[f, p]: the pp-p rank of the pipeline whose pp-0 rank is f (pp is outermost)
    members = np.arange(stride)[:, None] + stride * np.arange(pp)[None, :]
    distinct, first, inverse = np.unique(place_of[members], axis=0, return_index=True,
                                         return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    for u, row in enumerate(distinct):
        acts, pre, post = {}, {}, {}
        for p, where in enumerate(row):
            res = placed[where].result
            acts[p] = res.actions
            pre[p] = res.actions[0].start if res.actions else 0.0
            post[p] = res.step_s - (res.actions[-1].end if res.actions else 0.0)
        done = pipeline_makespan(acts, pre, post, run.cfg.parallel.stages)
        ranks = members[inverse == u]
        for p in range(pp):
            step[ranks[:, p]], bubble[ranks[:, p]] = done[p]
    return step, bubble


def _rank_table(run: RunPlan, traces: list[RankTrace], placed: list[_Placed],
                place_of: np.ndarray, class_of: np.ndarray, step: np.ndarray,
                bubble: np.ndarray, gpn: int) -> pa.Table:
    """ranks.parquet: one row per rank, built column by column (per-class and per-placement
    values gathered by each rank's class and placement)."""
    layout = run.layout
    ranks = np.arange(layout.world_size)
    coords = dict(zip(MESH_ORDER, np.unravel_index(ranks, layout.degrees)))
    coords["ep"] = coords["dp_shard"] % layout.ep

    def per_class(field: str) -> np.ndarray:
        return np.array([getattr(tr, field) for tr in traces], dtype=np.int64)[class_of]

    def per_place(field: str) -> np.ndarray:
        return np.array([getattr(p.result, field) for p in placed], dtype=np.float64)[place_of]

    peak = per_class("peak_bytes")
    cols: dict[str, np.ndarray] = dict(rank=ranks, node=ranks // gpn, local_rank=ranks % gpn)
    cols.update({d: coords[d] for d in COORD_DIMS})
    cols["class_id"] = class_of
    cols.update({f: per_class(f) for f in ("peak_bytes", "param_bytes", "grad_bytes",
                                          "optimizer_bytes", "activation_bytes", "other_bytes",
                                          "flops", "hbm_bytes", "comm_bytes")})
    cols.update({f: per_place(f) for f in ("compute_s", "comm_s", "exposed_comm_s")})
    cols.update(bubble_s=bubble, step_s=step, fits=peak <= run.memory_limit_bytes)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema.RANKS},
                    schema=schema.RANKS)


def _row(table: pa.Table, i: int) -> dict:
    return table.slice(i, 1).to_pylist()[0]


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


def _timeline(traces: list[RankTrace], placed: list[_Placed], place_of: np.ndarray,
              binding: list[int]) -> dict:
    """Chrome trace event format (Perfetto, chrome://tracing): the simulated step of each
    class's binding rank, one process per class, one thread per stream; consecutive events of
    one module and phase on one stream are one span."""
    events: list[dict] = []
    for cid, (rank, tr) in enumerate(zip(binding, traces)):
        p = placed[place_of[rank]]
        k = tr.kernels
        res = p.result if p.result.spans is not None else simulate_step(
            k["kind"].to_pylist(), k["phase"].to_pylist(), k["stream"].to_pylist(),
            k["wait"].to_pylist(), k["weight"].to_pylist(), k["label"].to_pylist(),
            p.durations, p.slowdown, keep_spans=True)
        names = [m or "(root)" for m in k["module"].to_pylist()]
        phases = k["phase"].to_pylist()
        events.append({"name": "process_name", "ph": "M", "ts": 0, "dur": 0, "pid": cid,
                       "tid": 0, "args": {"name": f"class {cid} (rank {rank})"}})
        streams: dict[str, int] = {}
        last: dict[str, dict] = {}
        for stream, start, end, index in res.spans or []:
            name, cat = names[index], phases[index]
            ts, dur = start * 1e6, (end - start) * 1e6
            prev = last.get(stream)
            if (prev is not None and prev["name"] == name and prev["cat"] == cat
                    and abs(prev["ts"] + prev["dur"] - ts) < 1e-6):
                prev["dur"] = ts + dur - prev["ts"]
                continue
            tid = streams.get(stream)
            if tid is None:
                tid = streams[stream] = len(streams)
            ev = {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": cid,
                  "tid": tid}
            events.append(ev)
            last[stream] = ev
        for s, tid in streams.items():
            events.append({"name": "thread_name", "ph": "M", "ts": 0, "dur": 0, "pid": cid,
                           "tid": tid, "args": {"name": s}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
