"""What a run costs besides executing ranks, at 16,384 ranks, and what a warm run costs end to
end (#11):

1. Llama 3 405B TP8 x PP16 x DP128 on 16,384 H100s (seq 8192, 16 micro-batches, 1F1B, full
   AC): planning (`planner.plan_run`), the rank classes alone (`planner.compute_classes`), the
   merge (`plan.merge`: pricing, the event simulation per class and placement, the pipeline
   replays, 16,384 rank rows, timeline.json), writing the run directory's tables
   (`ClusterPlan.write`) and its report.html (which `write` adds by default). The classes'
   traces are obtained as the coordinator does, in this process, against `--cache-dir`: read
   as kept rebuilt, else through the layer memo (executed the first time); the merge and the
   writes do not depend on how the traces were obtained.
2. Llama 3 70B TP8 x PP8 x DP16 on 1024 H100s (1F1B, 8 micro-batches, full AC) through
   `simdist run`, twice against one fresh cache dir: cold (everything executes) and warm
   (every class rebuilt from the layer store, in the driver, without Ray).

    python benchmarks/scale_16k.py [--repeats 3] [--cache-dir DIR] [--skip-70b] [--skip-405b]

Writes benchmarks/results/scale_16k.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PLAN_405B = {"model": {"preset": "llama3-405b"},
             "training": {"seq_len": 8192, "micro_batch": 1, "global_batch": 2048,
                          "activation_checkpointing": "full"},
             "parallel": {"tp": 8, "pp": 16, "dp_shard": 128, "pp_schedule": "1f1b"},
             "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 2048}}
PLAN_70B = {"model": {"preset": "llama3-70b"},
            "training": {"seq_len": 8192, "micro_batch": 1, "global_batch": 128,
                         "activation_checkpointing": "full"},
            "parallel": {"tp": 8, "pp": 8, "dp_shard": 16, "pp_schedule": "1f1b"},
            "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 128}}


def _timed(fn, repeats: int) -> tuple[list[float], object]:  # noqa: ANN001
    out, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
    return out, result


def _figure(samples: list[float]) -> dict:
    return dict(min_s=round(min(samples), 4), median_s=round(statistics.median(samples), 4),
                samples_s=[round(x, 4) for x in samples])


def bench_405b(repeats: int, cache_dir: str) -> dict:
    from simdist.calibrate import calibration_for
    from simdist.config import load_config
    from simdist.families import build_model
    from simdist.memo import simulate_rank
    from simdist.plan import merge
    from simdist.planner import compute_classes, plan_run
    from simdist.rebuilt import keep_rebuilt, stored_rank

    cfg = load_config(dict(PLAN_405B, simulation={"cache_dir": cache_dir}))
    plan_s, run = _timed(lambda: plan_run(cfg), repeats)
    model = build_model(run.spec, "meta")
    classes_s, _ = _timed(lambda: compute_classes(cfg, run.spec, run.layout, model), repeats)
    t0 = time.perf_counter()
    traces = []
    for task in run.tasks:  # as the coordinator does: kept rebuilt, else through the memo
        trace = stored_rank(task)
        if trace is None:
            trace = simulate_rank(task)
            keep_rebuilt(task, trace)
        traces.append(trace)
    traces_s = time.perf_counter() - t0
    calib = calibration_for(cfg)
    merge_s, plan = _timed(lambda: merge(run, traces, {"flops_per_token": run.flops_per_token},
                                         calib), repeats)
    from simdist.report import RunDir, write_report_or_warn

    write_s, report_s = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = plan.write(Path(tmp) / "run", report=False)
            write_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            write_report_or_warn(RunDir(out))  # what `write` adds by default: report.html
            report_s.append(time.perf_counter() - t0)
    how = sorted({tr.layer_memo for tr in traces})
    return dict(world_size=run.layout.world_size, rank_classes=len(run.classes),
                kernel_events=sum(tr.kernels.num_rows for tr in traces),
                traces_via=how, traces_s=round(traces_s, 1),
                planning=_figure(plan_s), classes=_figure(classes_s), merge=_figure(merge_s),
                write=_figure(write_s), report=_figure(report_s), step_time_s=round(plan.summary["step_time_s"], 4),
                mfu=round(plan.summary["mfu"], 4), bottleneck=plan.summary["bottleneck"])


def _simdist_run(config: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simdist.cli", "run", str(config), "--out",
                           str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simdist run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    s = json.loads((out / "plan.json").read_text())
    layer = s["cache"]["layer"]
    return dict(wall_s=round(wall, 2), sim_wall_s=round(s["sim_wall_s"], 2),
                actors=s["execution"]["actors"], ray=s["execution"].get("ray"),
                layer_hits=layer["hits"], layer_misses=layer["misses"],
                blocks_executed=layer["blocks_executed"], rank_classes=s["rank_classes"],
                step_time_s=round(s["step_time_s"], 4))


def bench_70b() -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(PLAN_70B, simulation={"cache_dir": str(Path(tmp) / "cache")})
        path = Path(tmp) / "llama3-70b-3d.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cold = _simdist_run(path, Path(tmp) / "cold")
        warm = _simdist_run(path, Path(tmp) / "warm")
        same = ((Path(tmp) / "cold" / "ranks.parquet").read_bytes()
                == (Path(tmp) / "warm" / "ranks.parquet").read_bytes())
    return dict(cold=cold, warm=warm, ranks_parquet_identical=same)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "simdist-scale16k"),
                    help="layer store for the 405B traces (kept between runs)")
    ap.add_argument("--skip-405b", action="store_true")
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_16k.json"))
    args = ap.parse_args()
    rec: dict = dict(machine=dict(cpus=os.cpu_count(), platform=platform.platform(),
                                  load_at_start=os.getloadavg()[0]))
    if not args.skip_405b:
        r = rec["llama3_405b_16k"] = bench_405b(args.repeats, args.cache_dir)
        print(f"405B, {r['world_size']} ranks, {r['rank_classes']} classes, "
              f"{r['kernel_events']} kernel events (traces {', '.join(r['traces_via'])}, "
              f"{r['traces_s']} s): planning {r['planning']['min_s']} s, classes "
              f"{r['classes']['min_s']} s, merge {r['merge']['min_s']} s, write "
              f"{r['write']['min_s']} s, report.html {r['report']['min_s']} s (min of {args.repeats})")
    if not args.skip_70b:
        r = rec["llama3_70b_1024"] = bench_70b()
        print(f"70B TP8 x PP8 x DP16 via simdist run: cold {r['cold']['wall_s']} s "
              f"({r['cold']['actors']} actors), warm {r['warm']['wall_s']} s "
              f"({r['warm']['actors']} actors, Ray {r['warm']['ray']}); ranks.parquet "
              f"identical: {r['ranks_parquet_identical']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
