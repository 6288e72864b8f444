"""Llama 3 405B as it was trained: TP8 x PP16 x DP128 on 16,384 H100s (seq 8192, 16M-token
batches = 2048 sequences, so 16 micro-batches of 1 per pipeline per step, 1F1B).

    python benchmarks/llama405b_3d.py [--workers N] [--out benchmarks/results/llama405b_3d.json]

Prints and writes: rank classes, simulated ranks, simulation wall time, peak memory per stage,
step time and MFU from the first time model."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ray

from simdist.config import load_config
from simdist.coordinator import simulate

CONFIG = dict(
    model={"preset": "llama3-405b"},
    training={"seq_len": 8192, "micro_batch": 1, "global_batch": 2048,
              "activation_checkpointing": "full"},
    parallel={"tp": 8, "pp": 16, "dp_shard": 128, "pp_schedule": "1f1b"},
    cluster={"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 2048},
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/llama405b_3d.json")
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = load_config(CONFIG)
    t0 = time.perf_counter()
    plan = simulate(cfg, workers=args.workers)
    wall = time.perf_counter() - t0
    ray.shutdown()
    ranks = plan.ranks.to_pylist()
    per_stage = {}
    for r in ranks:
        per_stage.setdefault(r["pp"], r)
    s = plan.summary
    result = dict(
        benchmark="llama405b_3d", config=CONFIG, world_size=s["world_size"],
        rank_classes=s["rank_classes"], simulated_ranks=s["simulated_ranks"],
        sim_wall_s=round(wall, 1),
        class_wall_s=[round(tr.wall_s, 1) for tr in plan.traces.values()],
        peak_gib_per_stage={pp: round(r["peak_bytes"] / 2**30, 2) for pp, r in sorted(per_stage.items())},
        fits=s["fits"], step_time_s=round(s["step_time_s"], 3), mfu=round(s["mfu"], 4),
        tokens_per_s_per_gpu=round(s["tokens_per_s_per_gpu"], 1),
        machine=dict(cpus=os.cpu_count(), platform=platform.platform()),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
