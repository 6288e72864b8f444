"""Digests of every run-directory table for the example configs and a set of test plans, so a
restructuring can show it changed no answer: run before and after, compare the two JSON files.

    python scripts/rows_digest.py --out before.json
    python scripts/rows_digest.py --out after.json --against before.json   # exit 1 on a change
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

# (name, config file, overrides): the example configs, then one plan per parallelism kind.
PLANS = [(p.stem, str(p), []) for p in sorted((ROOT / "configs").glob("*.yaml"))] + [
    ("tp_sp_fsdp_full_ac", "configs/quickstart.yaml",
     ["parallel.tp=2", "training.activation_checkpointing=full", "training.global_batch=16"]),
    ("hsdp", "configs/quickstart.yaml", ["parallel.dp_replicate=2", "cluster.nodes=2"]),
    ("ddp", "configs/quickstart.yaml", ["parallel.dp_replicate=8", "parallel.dp_shard=1"]),
    ("zero1", "configs/quickstart.yaml", ["parallel.zero_stage=1"]),
    ("pp_1f1b", "configs/quickstart.yaml", ["parallel.pp=2", "model.n_layers=8"]),
    ("pp_interleaved", "configs/quickstart.yaml",
     ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=8",
      "training.global_batch=32"]),
    ("pp_zero_bubble", "configs/quickstart.yaml",
     ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "model.n_layers=8"]),
    ("pp_gpipe_uneven", "configs/quickstart.yaml",
     ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_layers=[3,5]",
      "model.n_layers=8"]),
    ("cp4", "configs/quickstart.yaml", ["parallel.cp=4", "training.global_batch=4"]),
    ("gpt_eager_tp_selective", "configs/quickstart.yaml",
     ["model.preset=gpt-debug", "training.attention=eager", "parallel.tp=2",
      "training.activation_checkpointing=selective", "training.global_batch=8"]),
    ("moe_ep4_zipf", "configs/quickstart.yaml",
     ["model.preset=moe-debug", "parallel.ep=4", "training.routing=zipf:1.2"]),
]

TABLES = ("ranks", "ops", "collectives", "memory")


def digests(plan) -> dict[str, str]:  # noqa: ANN001 - the package's result type
    out = {}
    for name in TABLES:
        buf = io.BytesIO()
        pq.write_table(getattr(plan, name), buf)
        out[name] = hashlib.blake2b(buf.getvalue(), digest_size=16).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--against")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("SIMDIST_CACHE_DIR", tempfile.mkdtemp(prefix="simdist-digest-"))
    os.chdir(ROOT)
    import ray

    from simdist.config import load_config
    from simdist.coordinator import simulate

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    result = {}
    for name, path, overrides in PLANS:
        if args.only and name not in args.only:
            continue
        cfg = load_config(path, overrides)
        result[name] = digests(simulate(cfg))
        print(name, result[name]["ranks"], flush=True)
    ray.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.against:
        before = json.loads(Path(args.against).read_text())
        changed = [(n, t) for n in result for t in TABLES
                   if n in before and before[n][t] != result[n][t]]
        for n, t in changed:
            print(f"CHANGED {n} {t}.parquet")
        print(f"{len(result)} plans, {len(changed)} tables changed")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
