"""Layer memo benchmark (simdist/mode/layer_memo.py, simdist/cache/layers.py).

Part 1, one rank in this process (no Ray): Llama 3 70B, FSDP over 8 GPUs, seq 8192, one
micro-batch: the rank at 8 and at 80 layers, through the memo and executed in full, and whether
memo and full execution give the same rows.

Part 2, a whole plan twice against one fresh cache dir, the way consecutive `simdist run`s see
it: Llama 3 70B, TP8 x PP8 x DP16 (1024 GPUs), seq 8192, 1F1B with 8 micro-batches. Run 1 (cold)
executes every class's short stages and stores the memo models and dispatch entries; run 2
(warm) reads them back. Ray is started once, outside the timed region; each run starts its own
actors.

    python benchmarks/layer_memo.py
    python benchmarks/layer_memo.py --skip-rank          # part 2 only

Writes benchmarks/results/layer_memo.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import git_commit  # noqa: E402


def rank_part(seq_len: int) -> dict:
    from simdist.config import load_config
    from simdist.memo import simulate_rank
    from simdist.planner import plan_run

    def run(n_layers: int, memo: bool):  # noqa: ANN202
        cfg = load_config(dict(model=dict(preset="llama3-70b", n_layers=n_layers),
                               training=dict(seq_len=seq_len),
                               simulation=dict(layer_memo=memo)))
        task = plan_run(cfg, use_cache=False).tasks[0]
        task = replace(task, layer_memo=memo)
        t0 = time.perf_counter()
        tr = simulate_rank(task)
        return time.perf_counter() - t0, tr

    run(2, False)  # warm torch's lazy imports
    out: dict = {}
    traces = {}
    for n in (8, 80):
        for memo in (True, False):
            walls = []
            for _ in range(2):
                wall, tr = run(n, memo)
                walls.append(wall)
            traces[(n, memo)] = tr
            out[f"{n}_layers_{'memo' if memo else 'full'}_s"] = min(walls)
            print(f"  {n:>2} layers {'memo' if memo else 'full'}: {min(walls):.2f} s "
                  f"({tr.layer_memo}, blocks executed {tr.blocks_executed}/{tr.blocks_total})",
                  flush=True)
    for n in (8, 80):
        a, b = traces[(n, True)], traces[(n, False)]
        out[f"{n}_layers_identical"] = bool(
            a.peak_bytes == b.peak_bytes and a.ops.equals(b.ops) and a.memory.equals(b.memory)
            and a.collectives.equals(b.collectives))
    out["ratio_80_over_8_memo"] = out["80_layers_memo_s"] / out["8_layers_memo_s"]
    out["ratio_80_over_8_full"] = out["80_layers_full_s"] / out["8_layers_full_s"]
    out["peak_bytes_80"] = traces[(80, True)].peak_bytes
    return out


def plan_config(cache_dir: str, seq_len: int, stage_sharing: bool = True) -> dict:
    return {
        "model": {"preset": "llama3-70b"},
        "training": {"seq_len": seq_len, "micro_batch": 1, "global_batch": 128,
                     "activation_checkpointing": "full"},
        "parallel": {"tp": 8, "pp": 8, "dp_shard": 16, "pp_schedule": "1f1b"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 128},
        "simulation": {"cache_dir": cache_dir, "stage_sharing": stage_sharing},
    }


def plan_part(seq_len: int, workers: int | None) -> dict:
    import ray

    import simdist

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", configure_logging=False)
    cache_dir = tempfile.mkdtemp(prefix="simdist-bench-layers-")
    unshared_dir = tempfile.mkdtemp(prefix="simdist-bench-layers-unshared-")
    runs = {}
    try:
        # cold and warm against one cache dir; then cold again on a fresh one with
        # simulation.stage_sharing off (every middle rank simulated on its own)
        for label in ("cold", "warm", "unshared"):
            cfg = simdist.load_config(plan_config(unshared_dir if label == "unshared" else
                                                  cache_dir, seq_len, label != "unshared"))
            t0 = time.perf_counter()
            plan = simdist.simulate(cfg, workers=workers)
            wall = time.perf_counter() - t0
            runs[label] = (wall, plan)
            layer = plan.summary["cache"]["layer"]
            print(f"  {label}: {wall:.1f} s  classes {plan.summary['rank_classes']}  layer "
                  f"hits {layer['hits']} misses {layer['misses']} fallbacks {layer['fallbacks']} "
                  f"blocks executed {layer['blocks_executed']}/{layer['blocks_total']}  "
                  f"op-level hits {plan.summary['cache']['hits']} misses "
                  f"{plan.summary['cache']['misses']}  shared {layer['shared']}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.rmtree(unshared_dir, ignore_errors=True)
    (cold_s, cold), (warm_s, warm), (unshared_s, unshared) = (runs[k] for k in
                                                             ("cold", "warm", "unshared"))
    return {
        "plan": "llama3-70b TP8 x PP8 x DP16 (1024 GPUs), 1F1B, 8 micro-batches, full AC",
        "seq_len": seq_len,
        "cold_s": cold_s, "warm_s": warm_s, "speedup": cold_s / warm_s,
        "rank_classes": cold.summary["rank_classes"],
        "identical_rank_rows": cold.ranks.equals(warm.ranks),
        "unshared_cold_s": unshared_s,
        "identical_to_unshared": all(getattr(cold, t).equals(getattr(unshared, t)) for t in
                                     ("ranks", "ops", "collectives", "memory", "kernels")),
        "cold_cache": cold.summary["cache"]["layer"], "warm_cache": warm.summary["cache"]["layer"],
        "op_level": {k: {f: p.summary["cache"][f] for f in ("hits", "misses", "loaded")}
                     for k, p in (("cold", cold), ("warm", warm))},
        "peak_bytes_max": cold.summary["peak_bytes_max"], "fits": cold.summary["fits"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-rank", action="store_true")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "layer_memo.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    import simdist

    result: dict = {
        "benchmark": "layer_memo",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]},
        "versions": {"simdist": simdist.__version__, "torch": torch.__version__,
                     "ray": ray.__version__},
        "commit": git_commit(),
    }
    out = Path(args.out)
    # A part that is skipped keeps its figures from the last run that measured it (each part
    # records the commit it was measured at).
    earlier = json.loads(out.read_text()) if out.exists() else {}
    if not args.skip_rank:
        print("one rank: llama3-70b FSDP 8 GPUs, seq", args.seq_len, "(min of 2)")
        result["rank"] = dict(rank_part(args.seq_len), commit=result["commit"])
    elif "rank" in earlier:
        result["rank"] = dict(earlier["rank"], commit=earlier["rank"].get("commit", earlier.get("commit")))
    if not args.skip_plan:
        print("plan twice against a fresh cache dir:")
        result["plan"] = dict(plan_part(args.seq_len, args.workers), commit=result["commit"])
    elif "plan" in earlier:
        result["plan"] = dict(earlier["plan"], commit=earlier["plan"].get("commit", earlier.get("commit")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if "rank" in result:
        r = result["rank"]
        print(f"80 vs 8 layers: memo {r['ratio_80_over_8_memo']:.2f}x, full "
              f"{r['ratio_80_over_8_full']:.2f}x; identical rows: "
              f"{r['8_layers_identical'] and r['80_layers_identical']}")
    if "plan" in result:
        p = result["plan"]
        print(f"plan cold {p['cold_s']:.1f} s, warm {p['warm_s']:.1f} s: {p['speedup']:.1f}x; "
              f"identical rank rows: {p['identical_rank_rows']}; cold without stage sharing "
              f"{p['unshared_cold_s']:.1f} s, identical tables: {p['identical_to_unshared']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
