"""Sweep benchmark: a 32-plan grid of Llama 3 70B on 1024 H100s (128 nodes x 8), simulated twice
against one fresh cache dir — cold (empty store) and warm (the store the cold sweep wrote) —
each as one `simdist sweep` (simdist.sweep.run_sweep: one Ray session, every plan through
simulate_async). Prints plans/s cold and warm and what the warm sweep reused: plans copied from
the plan store (plan.json `cache.plan.reused`), and for the others the layer store (plan.json
`cache.layer` hits / misses / blocks executed, summed over the plans) and the dispatch cache
(`cache.hits` / `misses`). `--no-plan-store` measures the warm sweep without the plan store
(its entries removed before the warm sweep: every plan rebuilt from the layer store).

Grid: parallel.tp 4,8 x parallel.pp 1,2,4,8 x training.activation_checkpointing full,selective
x training.micro_batch 1,2 (32 plans), seq 8192, global_batch 1024 (1 to 64 micro-batches per
step), ZeRO-3 over the rest (dp_shard = 1024 / (tp pp)), 1F1B.

    python benchmarks/sweep.py                       # the 32 plans (long: run on a quiet machine)
    python benchmarks/sweep.py --limit 2             # the first 2 plans: checks that it runs
    python benchmarks/sweep.py --limit 4 --seq-len 2048 --out /tmp/sweep.json

Writes benchmarks/results/sweep.json (override with --out).
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
from pathlib import Path

from provenance import git_commit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRID = ["parallel.tp=4,8", "parallel.pp=1,2,4,8",
        "training.activation_checkpointing=full,selective", "training.micro_batch=1,2"]


def base_config(seq_len: int, global_batch: int, cache_dir: str) -> dict:
    return {
        "model": {"preset": "llama3-70b"},
        "training": {"seq_len": seq_len, "global_batch": global_batch, "dtype": "bf16"},
        "parallel": {"dp_shard": -1, "zero_stage": 3, "pp_schedule": "1f1b"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 128},
        "simulation": {"cache_dir": cache_dir},
    }


def reuse(out: Path, rows: list[dict]) -> dict:
    """Plans copied from the plan store, and the layer store and dispatch cache figures summed
    over the other simulated plans' plan.json (a copied plan's are those of its first run)."""
    tot = dict(plans_reused=0, layer_hits=0, layer_misses=0, layer_fallbacks=0, layer_full=0,
               blocks_executed=0, blocks_total=0, dispatch_hits=0, dispatch_misses=0)
    for r in rows:
        if r["status"] != "simulated":
            continue
        cache = json.loads((out / r["run_dir"] / "plan.json").read_text())["cache"]
        if (cache.get("plan") or {}).get("reused"):
            tot["plans_reused"] += 1
            continue
        layer = cache.get("layer") or {}
        for k in ("hits", "misses", "fallbacks", "full"):
            tot[f"layer_{k}"] += int(layer.get(k) or 0)
        tot["blocks_executed"] += int(layer.get("blocks_executed") or 0)
        tot["blocks_total"] += int(layer.get("blocks_total") or 0)
        tot["dispatch_hits"] += int(cache.get("hits") or 0)
        tot["dispatch_misses"] += int(cache.get("misses") or 0)
    n = tot["layer_hits"] + tot["layer_misses"] + tot["layer_fallbacks"] + tot["layer_full"]
    tot["layer_hit_rate"] = tot["layer_hits"] / n if n else 0.0
    return tot


def one_sweep(cfg: dict, out: Path, limit: int | None, workers: int | None) -> dict:
    from simdist.sweep import run_sweep

    t0 = time.perf_counter()
    res = run_sweep(cfg, GRID, [], out, limit=limit, workers=workers, progress=True)
    wall = time.perf_counter() - t0
    simulated = [r for r in res.rows if r["status"] == "simulated"]
    return dict(
        wall_s=wall, plans=len(res.rows), simulated=len(simulated),
        skipped=sum(r["status"] == "skipped" for r in res.rows),
        failed=sum(r["status"] == "failed" for r in res.rows),
        plans_per_s=len(simulated) / wall if wall else 0.0,
        sim_wall_s_sum=sum(r["sim_wall_s"] or 0.0 for r in simulated),
        reuse=reuse(out, res.rows),
        best=[{k: r[k] for k in ("parallel.tp", "parallel.pp", "training.activation_checkpointing",
                                 "training.micro_batch", "fits", "tokens_per_s_per_gpu",
                                 "peak_bytes_max")} for r in simulated[:3]],
        skip_reasons=sorted({r["skip_reason"] for r in res.rows if r["skip_reason"]}),
        session={k: json.loads((out / "sweep.json").read_text()).get(k)
                 for k in ("ray", "actors_started")},
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N plans of the grid")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=None, help="rank actors per plan (default auto)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the cache and sweep directories here (default: a temporary "
                         "directory, removed); with --warm-only, the cache of an earlier run")
    ap.add_argument("--no-plan-store", action="store_true",
                    help="remove the plan store's entries before the warm sweep (the layer "
                         "store's warm path alone)")
    ap.add_argument("--warm-only", action="store_true",
                    help="only the warm sweep, against --work's cache (to measure a change to "
                         "the warm path without repeating the cold sweep)")
    args = ap.parse_args()
    if args.warm_only and args.work is None:
        ap.error("--warm-only needs --work (the cache dir of an earlier run)")

    import ray
    import torch

    import simdist

    load_start = list(os.getloadavg())  # 1, 5, 15 min: other work on the machine
    at_commit = git_commit()  # at the start: the code the sweeps import
    work = args.work or Path(tempfile.mkdtemp(prefix="simdist-bench-sweep-"))
    cache_dir = str(work / "cache")
    if not args.warm_only and Path(cache_dir).exists() and any(Path(cache_dir).iterdir()):
        sys.exit(f"{cache_dir} is not empty: the cold sweep must start from a fresh cache")
    cfg = base_config(args.seq_len, args.global_batch, cache_dir)
    previous = json.loads(args.out.read_text()) if args.warm_only and args.out.exists() else {}
    try:
        cold = previous.get("cold") if args.warm_only else one_sweep(
            cfg, work / "cold", args.limit, args.workers)
        shutil.rmtree(work / "warm", ignore_errors=True)
        if args.no_plan_store:
            shutil.rmtree(Path(cache_dir) / "plans", ignore_errors=True)
        warm = one_sweep(cfg, work / "warm", args.limit, args.workers)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = dict(
        benchmark="sweep",
        grid=GRID, limit=args.limit, seq_len=args.seq_len, global_batch=args.global_batch,
        plan_store=not args.no_plan_store,
        plan="llama3-70b on 1024 H100s (128 x 8), ZeRO-3 over the rest, 1F1B",
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(),
                     python=platform.python_version(), loadavg_start=load_start,
                     loadavg_end=list(os.getloadavg()), commit=at_commit),
        versions=dict(simdist=simdist.__version__, torch=torch.__version__, ray=ray.__version__),
        cold=cold, warm=warm,
        warm_over_cold=(warm["plans_per_s"] / cold["plans_per_s"])
        if cold and cold["plans_per_s"] else None,
    )
    if args.warm_only:  # the cold figures are the earlier run's, at its commit and load
        result["cold_from"] = previous.get("machine")
        result["warm_only"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in (("cold", cold), ("warm", warm)):
        if not r:
            continue
        u = r["reuse"]
        print(f"{name}: {r['simulated']} plans simulated ({r['skipped']} skipped, {r['failed']} "
              f"failed) in {r['wall_s']:.1f} s = {r['plans_per_s']:.3f} plans/s; plans copied "
              f"from the plan store {u.get('plans_reused', 0)}; the others: layer store "
              f"hits {u['layer_hits']} / misses {u['layer_misses']} (hit rate "
              f"{100 * u['layer_hit_rate']:.0f}%), blocks executed {u['blocks_executed']} of "
              f"{u['blocks_total']}; dispatch cache hits {u['dispatch_hits']:,} / misses "
              f"{u['dispatch_misses']:,}")
    if result["warm_over_cold"]:
        print(f"warm / cold plans/s: {result['warm_over_cold']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
