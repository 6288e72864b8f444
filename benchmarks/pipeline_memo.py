"""Pipeline memo benchmark (simdist/mode/pipeline_memo.py): does a pipeline plan's simulation
cost stop growing with its micro-batch count?

The plan of issue #11: GPT, 96 layers, hidden 16384, 128 heads, seq 2048, TP8 x PP16
(interleaved 1F1B, 2 virtual stages per rank: 32 stages of 3 blocks) x DP15 (FSDP) on 1920
A100s, micro-batch 1, at 16 and at 144 micro-batches per step (global batch 240 / 2160), with
the pipeline memo on and off (`simulation.pipeline_memo`). Each run is one `simdist run` with
`--set` overrides, in its own process (its own local Ray), against a fresh, empty cache dir:
a user's first run. The figure is plan.json's `sim_wall_s`; the process wall is recorded too.
`--small` runs a plan of the same structure that fits a laptop: GPT 24 layers, hidden 1024,
TP2 x PP4 (interleaved, v=2) x DP2 on 16 GPUs. `--plan pp64` runs the issue's largest plan
(Narayanan et al. 2021's 1T row): GPT 128 layers, hidden 25600, 160 heads, TP8 x PP64
(interleaved, v=2: 128 stages of 1 block, too shallow for the layer memo) x DP6 on 3072
A100s, 512 micro-batches (`--counts 512 --memo on`; executed in full it does not finish);
`--plan pp64-narayanan` the same plan as the paper ran it (full recompute, DDP reducing once
per step, no sequence parallelism: tests/published_runs.py's assumptions for Table 1).

    python benchmarks/pipeline_memo.py                  # the issue's plan (tens of minutes)
    python benchmarks/pipeline_memo.py --small          # a few minutes
    python benchmarks/pipeline_memo.py --counts 16 144 --memo on
    python benchmarks/pipeline_memo.py --plan pp64 --counts 512 --memo on

Writes benchmarks/results/pipeline_memo[-small].json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import git_commit  # noqa: E402

PLANS = {
    "issue": dict(
        model=dict(preset="gpt-146b", n_layers=96, dim=16384, n_heads=128),
        training=dict(seq_len=2048, micro_batch=1),
        parallel=dict(tp=8, pp=16, pp_schedule="interleaved_1f1b", pp_virtual_stages=2),
        cluster=dict(gpu="a100-80gb", gpus_per_node=8, nodes=240),
        dp=15),
    "small": dict(
        model=dict(preset="gpt-1.7b", n_layers=24, dim=1024, n_heads=16),
        training=dict(seq_len=1024, micro_batch=1),
        parallel=dict(tp=2, pp=4, pp_schedule="interleaved_1f1b", pp_virtual_stages=2),
        cluster=dict(gpu="a100-80gb", gpus_per_node=8, nodes=2),
        dp=2),
    "pp64": dict(
        model=dict(preset="gpt-146b", n_layers=128, dim=25600, n_heads=160),
        training=dict(seq_len=2048, micro_batch=1),
        parallel=dict(tp=8, pp=64, pp_schedule="interleaved_1f1b", pp_virtual_stages=2),
        cluster=dict(gpu="a100-80gb", gpus_per_node=8, nodes=384),
        simulation=dict(rank_timeout_s=3000),  # one class's build at 512 micro-batches
        dp=6),
    # the same plan as Narayanan et al. ran it (tests/published_runs.py's assumptions for their
    # Table 1: full recompute, plain data parallelism reducing once per step, no sequence
    # parallelism, 2021 attention, fused pointwise kernels)
    "pp64-narayanan": dict(
        model=dict(preset="gpt-146b", n_layers=128, dim=25600, n_heads=160),
        training=dict(seq_len=2048, micro_batch=1, activation_checkpointing="full",
                      attention="eager", grad_sync="per_step", compile=True),
        parallel=dict(tp=8, pp=64, pp_schedule="interleaved_1f1b", pp_virtual_stages=2,
                      dp_replicate=6, dp_shard=1, sequence_parallel=False),
        cluster=dict(gpu="a100-80gb", gpus_per_node=8, nodes=384),
        simulation=dict(rank_timeout_s=3000),
        dp=6),
}


def run_once(config: Path, n: int, dp: int, memo: bool, work: Path) -> dict:
    out, cache = work / f"run-{n}-{'memo' if memo else 'full'}", work / f"cache-{n}-{memo}"
    cmd = [sys.executable, "-m", "simdist.cli", "run", str(config), "--out", str(out),
           "--set", f"training.global_batch={dp * n}",
           "--set", f"simulation.pipeline_memo={'true' if memo else 'false'}",
           "--set", f"simulation.cache_dir={cache}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    plan = json.loads((out / "plan.json").read_text())
    row = dict(microbatches=n, pipeline_memo=memo, sim_wall_s=plan["sim_wall_s"],
               process_wall_s=wall, rank_classes=plan["rank_classes"],
               pipeline=plan["cache"].get("pipeline"), step_time_s=plan["step_time_s"],
               peak_bytes_max=plan["peak_bytes_max"], load_after=os.getloadavg()[0])
    print(f"  {n:>4} micro-batches, memo {'on ' if memo else 'off'}: "
          f"sim_wall_s {row['sim_wall_s']:.1f} (process {wall:.1f} s), "
          f"pipeline {row['pipeline']}, step {row['step_time_s']:.3f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the small plan of the same structure")
    ap.add_argument("--plan", choices=sorted(PLANS), default=None,
                    help="a plan by name (default: issue; --small is --plan small)")
    ap.add_argument("--counts", type=int, nargs="+", default=[16, 144])
    ap.add_argument("--memo", choices=["on", "off", "both"], default="both")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = args.plan or ("small" if args.small else "issue")
    plan = dict(PLANS[name])
    dp = plan.pop("dp")
    memos = {"on": [True], "off": [False], "both": [True, False]}[args.memo]
    rows = []
    with tempfile.TemporaryDirectory(prefix="simdist-pipeline-memo-") as tmp:
        work = Path(tmp)
        config = work / "plan.json"
        config.write_text(json.dumps(plan))  # JSON is YAML
        for memo in memos:
            for n in args.counts:
                rows.append(run_once(config, n, dp, memo, work))
    by = {(r["microbatches"], r["pipeline_memo"]): r["sim_wall_s"] for r in rows}
    result = dict(
        plan=name, config=plan, dp=dp, rows=rows, commit=git_commit(),
        machine=dict(cpus=os.cpu_count(), python=platform.python_version()),
        ratios={f"{'memo' if m else 'full'} {max(args.counts)}/{min(args.counts)}":
                by[(max(args.counts), m)] / by[(min(args.counts), m)]
                for m in memos if len(args.counts) > 1})
    # memo and full execution must give the same plan: compare the figures both record
    result["same_plan"] = {
        n: all(a[k] == b[k] for k in ("step_time_s", "peak_bytes_max"))
        for n in args.counts
        for a in rows if a["microbatches"] == n and a["pipeline_memo"]
        for b in rows if b["microbatches"] == n and not b["pipeline_memo"]}
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    print(f"  memo and full execution give the same step time and peak: {result['same_plan']}")
    out = args.out or HERE / "results" / f"pipeline_memo{'' if name == 'issue' else '-' + name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
