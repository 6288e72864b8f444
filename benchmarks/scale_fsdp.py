"""Scale benchmark: does the cost of a simulation follow the number of distinct ranks, not the
number of GPUs?

Llama 3 70B with FSDP (ZeRO-3), the same per-rank plan (seq_len, micro_batch 1, global_batch =
dp so one micro-batch per step) on 8 GPUs (1 node) and on 1024 GPUs (128 nodes). Ray is started
once, outside the timed region, so what is compared is the cost of `simdist.simulate` itself:
preparing the plan, starting the rank actors, simulating one rank per equivalence class, merging.

    python benchmarks/scale_fsdp.py                    # seq 8192, 2 samples per size
    python benchmarks/scale_fsdp.py --seq-len 2048 --repeats 1
    python benchmarks/scale_fsdp.py --repeats 3 --wait-load 2   # on a shared machine

Every sample starts from a fresh, empty cache dir (`--cache cold`, the default), so no sample
profits from an earlier one; the layer memo (identical blocks executed once per class, see
simdist/mode/layer_memo.py) runs as in a user's first `simdist run`. `--cache off` is
`--no-cache`: both cache levels off, every block executed.

Writes benchmarks/results/scale_fsdp.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from provenance import git_commit

HERE = Path(__file__).resolve().parent


def config(nodes: int, seq_len: int) -> dict:
    return {
        "model": {"preset": "llama3-70b"},
        "training": {"seq_len": seq_len, "micro_batch": 1, "dtype": "bf16"},  # global_batch = dp
        "parallel": {"dp_shard": -1},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": nodes},
    }


def actor_start_s(n: int) -> float:
    """Seconds to start `n` rank actors and have each import the simulation stack (what every
    `simulate` call pays before its first rank), measured on its own."""
    import ray

    from simdist.workers.pool import start_workers

    t0 = time.perf_counter()
    actors = start_workers(n)
    ray.get([a.node_id.remote() for a in actors])
    wall = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    return wall


def wait_for_load(limit: float, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)


def one_run(nodes: int, seq_len: int, workers: int | None, cache: str) -> dict:
    import simdist
    from simdist.planner import plan_run

    cfg = simdist.load_config(config(nodes, seq_len))
    t0 = time.perf_counter()
    classes = plan_run(cfg).classes  # the driver-side part, timed alone for the breakdown
    prepare_s = time.perf_counter() - t0

    raw = config(nodes, seq_len)
    tmp_cache = None
    if cache == "cold":  # a fresh, empty shared cache: nothing carried over between samples
        tmp_cache = tempfile.mkdtemp(prefix="simdist-bench-cache-")
        raw["simulation"] = {"cache_dir": tmp_cache}
    cfg = simdist.load_config(raw)
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        plan = simdist.simulate(cfg, workers=workers, use_cache=cache != "off")
        wall = time.perf_counter() - t0
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)

    s = plan.summary
    return {
        "wall_s": wall,
        "world_size": s["world_size"],
        "rank_classes": s["rank_classes"],
        "simulated_ranks": s["simulated_ranks"],
        "class_sizes": [len(c) for c in classes],
        "actors": s["execution"]["actors"],
        "class_wall_s": [plan.traces[i].wall_s for i in range(len(plan.traces))],
        "prepare_s": prepare_s,
        # 1-minute load average before/after: other work on the machine inflates the wall time
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "layer": s["cache"].get("layer"),
        "peak_bytes_max": s["peak_bytes_max"],
        "fits": s["fits"],
        "step_time_s": s["step_time_s"],
        "mfu": s["mfu"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--nodes", type=int, nargs=2, default=[1, 128], metavar=("SMALL", "LARGE"),
                    help="nodes of 8 GPUs for the two sizes (default 1 128: 8 vs 1024 GPUs)")
    ap.add_argument("--repeats", type=int, default=2, help="samples per size (alternating order)")
    ap.add_argument("--workers", type=int, default=None, help="rank actors (default: auto = CPUs)")
    ap.add_argument("--cache", choices=["off", "cold"], default="cold",
                    help="cold (the default: a fresh empty cache dir per sample, layer memo on) "
                         "or off (use_cache=False: no dispatch cache, no layer memo)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale_fsdp.json"))
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="on a shared machine: before each sample wait (up to 10 min) until the "
                         "1-minute load average is below L")
    args = ap.parse_args(argv)

    import ray

    import simdist

    # "local": always a fresh local Ray, never a cluster that happens to run on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", configure_logging=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        small, large = args.nodes
        samples: dict[int, list[dict]] = {small: [], large: []}
        for rep in range(args.repeats):
            order = (small, large) if rep % 2 == 0 else (large, small)
            for nodes in order:
                if args.wait_load is not None:
                    wait_for_load(args.wait_load)
                r = one_run(nodes, args.seq_len, args.workers, args.cache)
                samples[nodes].append(r)
                print(f"  sample {rep + 1}: {r['world_size']:>5} GPUs  classes {r['rank_classes']}  "
                      f"simulated {r['simulated_ranks']}  actors {r['actors']}  "
                      f"wall {r['wall_s']:.1f} s  per-class "
                      f"{', '.join(f'{w:.1f}' for w in r['class_wall_s'])} s  "
                      f"load {r['loadavg_1m'][0]:.1f}->{r['loadavg_1m'][1]:.1f}", flush=True)
        actors_small = samples[small][0]["actors"]
        actors_large = samples[large][0]["actors"]
        start = {n: actor_start_s(n) for n in sorted({actors_small, actors_large})}
    finally:
        ray.shutdown()

    def best(nodes: int) -> dict:
        return min(samples[nodes], key=lambda r: r["wall_s"])

    b_small, b_large = best(small), best(large)
    ratio = b_large["wall_s"] / b_small["wall_s"]
    result = {
        "benchmark": "scale_fsdp",
        "model": "llama3-70b",
        "plan": {"parallel": "FSDP (dp_shard = world)", "seq_len": args.seq_len, "micro_batch": 1,
                 "global_batch": "dp (one micro-batch per step)", "gpu": "h100-sxm",
                 "gpus_per_node": 8},
        "machine": {"cpus": os.cpu_count(), "ray_cpus": cpus, "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"simdist": simdist.__version__, "torch": __import__("torch").__version__,
                     "ray": ray.__version__},
        "statistic": f"min of {args.repeats} sample(s) per size",
        "shared_cache": args.cache,
        "commit": git_commit(),
        "small": {"nodes": small, **b_small, "wall_s_samples": [r["wall_s"] for r in samples[small]]},
        "large": {"nodes": large, **b_large, "wall_s_samples": [r["wall_s"] for r in samples[large]]},
        "ratio_large_over_small": ratio,
        "actor_start_s": {str(n): s for n, s in start.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"Llama 3 70B FSDP, seq {args.seq_len}, micro_batch 1, one micro-batch per step "
          f"({os.cpu_count()} CPUs, {result['statistic']})")
    for label, r in (("small", b_small), ("large", b_large)):
        print(f"  {r['world_size']:>5} GPUs: classes {r['rank_classes']:>2}  simulated ranks "
              f"{r['simulated_ranks']:>2}  actors {r['actors']}  wall {r['wall_s']:6.1f} s  "
              f"(per-class {', '.join(f'{w:.1f}' for w in r['class_wall_s'])} s; "
              f"prepare {r['prepare_s']:.1f} s)")
    print(f"  ratio {b_large['world_size']}/{b_small['world_size']} GPUs: {ratio:.2f}x")
    print(f"  actor start (alone): " + ", ".join(f"{n} actor(s) {s:.1f} s" for n, s in start.items()))
    if len(samples[small]) > 1:
        print(f"  all samples: {b_small['world_size']} GPUs "
              f"{[round(r['wall_s'], 1) for r in samples[small]]}, {b_large['world_size']} GPUs "
              f"{[round(r['wall_s'], 1) for r in samples[large]]}; median ratio "
              f"{statistics.median(r['wall_s'] for r in samples[large]) / statistics.median(r['wall_s'] for r in samples[small]):.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
