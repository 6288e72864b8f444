"""What the time model costs: the merge (pricing every class, the event simulation per
placement, the pipeline replays, the per-rank rows, timeline.json) of Llama 3 70B TP8 x PP8 x
DP16 on 1024 H100s (1F1B, 8 micro-batches, full AC), timed apart from the simulation that
produced its traces; and planning Llama 3 405B TP8 x PP16 x DP128 (16,384 GPUs) without Ray.

    python benchmarks/merge_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PLAN_70B = {"model": {"preset": "llama3-70b"},
            "training": {"seq_len": 8192, "micro_batch": 1, "global_batch": 128,
                         "activation_checkpointing": "full"},
            "parallel": {"tp": 8, "pp": 8, "dp_shard": 16},
            "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 128}}
PLAN_405B = {"model": {"preset": "llama3-405b"},
             "training": {"seq_len": 8192, "global_batch": 2048},
             "parallel": {"tp": 8, "pp": 16, "dp_shard": 128},
             "cluster": {"gpus_per_node": 8, "nodes": 2048}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_cost.json"))
    args = ap.parse_args()
    import ray

    from simdist.calibrate import calibration_for
    from simdist.config import load_config
    from simdist.coordinator import _run_tasks
    from simdist.families import flops_per_token
    from simdist.plan import merge
    from simdist.planner import plan_run
    import asyncio

    plan_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        big = plan_run(load_config(PLAN_405B))
        plan_s.append(time.perf_counter() - t0)
    cfg = load_config(PLAN_70B)
    run = plan_run(cfg)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t0 = time.perf_counter()
    traces, *_ = asyncio.run(_run_tasks(run.tasks, "auto", 3600, False))
    sim_s = time.perf_counter() - t0
    ray.shutdown()
    calib = calibration_for(cfg)
    summary = {"flops_per_token": flops_per_token(run.spec, cfg.training.seq_len)}
    merge_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = merge(run, traces, dict(summary), calib)
        merge_s.append(time.perf_counter() - t0)
    events = sum(tr.kernels.num_rows for tr in traces)
    rec = dict(plan_405b_classes=len(big.classes), plan_405b_s=plan_s,
               plan_70b_classes=len(run.classes), kernel_events=events,
               simulate_70b_s=sim_s, merge_70b_s=merge_s,
               step_time_s=plan.summary["step_time_s"], bottleneck=plan.summary["bottleneck"])
    print(f"plan 405B (16,384 GPUs, {len(big.classes)} classes): min {min(plan_s):.3f} s, "
          f"median {statistics.median(plan_s):.3f} s")
    print(f"70B 3D: {len(run.classes)} classes, {events} kernel events; simulation {sim_s:.1f} s; "
          f"merge min {min(merge_s):.3f} s, median {statistics.median(merge_s):.3f} s; "
          f"step {plan.summary['step_time_s']:.3f} s ({plan.summary['bottleneck']})")
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
