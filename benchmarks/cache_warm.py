"""Shared dispatch cache benchmark: the same plan twice against a fresh cache dir.

Run 1 starts with an empty store (cold: every op is a FakeTensorMode cache miss the first time
an actor sees it) and writes its entries back; run 2 starts from the store (warm: the workers'
FakeTensorMode caches are filled from the snapshot before the first rank). The pair runs twice:
with the CacheService as a Ray actor (`cold`, `warm`: the default) and inside the driver
(`cold_driver`, `warm_driver`: SIMDIST_CACHE_SERVICE=driver), each on its own fresh dir. A last
run with `use_cache=False` (`off`) is the reference without the store. Ray is started once, outside the timed
region; every run starts fresh actors (so nothing is warm in-process between runs), which is
what a user's consecutive `simdist run` commands see.

Also timed on their own: the codec (encode the store's entries, decode them) and the store (load,
write back).

    python benchmarks/cache_warm.py                             # llama3-8b FSDP on 8 GPUs
    python benchmarks/cache_warm.py --preset llama3-debug --seq-len 256 --repeats 3

Writes benchmarks/results/cache_warm.json (override with --out).
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

HERE = Path(__file__).resolve().parent


def config(preset: str, seq_len: int, gpus: int, n_layers: int | None, cache_dir: str) -> dict:
    model: dict = {"preset": preset}
    if n_layers:
        model["n_layers"] = n_layers
    return {
        "model": model,
        "training": {"seq_len": seq_len, "micro_batch": 1, "dtype": "bf16"},
        "parallel": {"dp_shard": -1},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": gpus, "nodes": 1},
        "simulation": {"cache_dir": cache_dir},
    }


def one_run(cfg_dict: dict, use_cache: bool, workers: int | None, placement: str) -> dict:
    import simdist

    os.environ["SIMDIST_CACHE_SERVICE"] = placement
    cfg = simdist.load_config(cfg_dict)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    plan = simdist.simulate(cfg, workers=workers, use_cache=use_cache)
    wall = time.perf_counter() - t0
    s = plan.summary
    c = s["cache"]
    return {
        "wall_s": wall,
        "rank_wall_s": [tr.wall_s for tr in plan.traces.values()],
        "rank_cpu_s": c.get("store", {}).get("rank_cpu_s"),
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "rank_classes": s["rank_classes"],
        "actors": s["execution"]["actors"],
        "peak_bytes_max": s["peak_bytes_max"],
        "cache": c,
    }


def inproc_pairs(cfg_dict: dict, pairs: int) -> dict:
    """The rank simulation alone, in this process, no Ray: FakeTensorMode's cache cleared
    (cold) vs cleared and filled from the encoded entries (warm), alternating, after one
    throwaway run that also produces the entries."""
    import simdist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from simdist.cache import codec
    from simdist.memo import simulate_rank
    from simdist.planner import plan_run

    task = plan_run(simdist.load_config(cfg_dict)).tasks[0]
    FakeTensorMode.cache_clear()
    simulate_rank(task)
    table, _ = codec.encode_cache()
    decoded, _ = codec.decode_table(table)
    out: dict[str, list] = {"cold": [], "warm": [], "cold_cpu": [], "warm_cpu": [],
                            "cold_misses": [], "warm_misses": []}
    for i in range(pairs):
        for label in (("cold", "warm") if i % 2 == 0 else ("warm", "cold")):
            FakeTensorMode.cache_clear()
            if label == "warm":
                codec.install(decoded)
            c0 = time.process_time()
            tr = simulate_rank(task)
            out[f"{label}_cpu"].append(time.process_time() - c0)
            out[label].append(tr.wall_s)
            out[f"{label}_misses"].append(tr.fake_cache["misses"])
            print(f"  in-process {label}: rank wall {tr.wall_s:.2f} s  cpu {out[f'{label}_cpu'][-1]:.2f} s  misses "
                  f"{tr.fake_cache['misses']}  hits {tr.fake_cache['hits']}", flush=True)
    out["median_cold_s"] = statistics.median(out["cold"])
    out["median_warm_s"] = statistics.median(out["warm"])
    out["median_paired_saving_s"] = statistics.median(c - w for c, w in zip(out["cold"], out["warm"]))
    out["median_cold_cpu_s"] = statistics.median(out["cold_cpu"])
    out["median_warm_cpu_s"] = statistics.median(out["warm_cpu"])
    return out


def codec_figures(cache_dir: str) -> dict:
    """Encode/decode/load/dump of the store the cold run wrote, timed on their own."""
    import torch

    from simdist.cache import codec
    from simdist.cache.store import CacheStore, serialize

    st = CacheStore(cache_dir, torch.__version__)
    t0 = time.perf_counter()
    loaded = st.load()
    load_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    with codec.gc_paused():
        decoded, skipped = codec.decode_table(loaded.entries)
    decode_ms = (time.perf_counter() - t0) * 1e3
    cache = {k: e for _, k, e in decoded}
    t0 = time.perf_counter()
    with codec.gc_paused():
        table, _ = codec.encode_cache(cache)
    encode_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    buf = serialize(table)
    serialize_ms = (time.perf_counter() - t0) * 1e3
    tmp = Path(tempfile.mkdtemp(prefix="simdist-cache-bench-"))
    try:
        t0 = time.perf_counter()
        CacheStore(tmp, torch.__version__).write_back(loaded.entries, loaded.costs)
        dump_ms = (time.perf_counter() - t0) * 1e3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kinds = loaded.entries["kind"].to_pylist()
    return {
        "entries": loaded.entries.num_rows, "valid": kinds.count("valid"),
        "bypass": kinds.count("bypass"), "cost_rows": loaded.costs.num_rows,
        "files": len(loaded.files), "file_bytes": loaded.bytes,
        "arrow_bytes_in_memory": loaded.entries.nbytes, "ipc_zstd_bytes": buf.size,
        "load_ms": load_ms, "decode_ms": decode_ms, "encode_ms": encode_ms,
        "serialize_ms": serialize_ms, "dump_ms": dump_ms, "decode_skipped": dict(skipped),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="cold/warm pairs, each on a fresh dir")
    ap.add_argument("--workers", type=int, default=1, help="rank actors (default 1)")
    ap.add_argument("--inproc-pairs", type=int, default=3,
                    help="cold/warm pairs of the rank simulation alone, in-process (0: skip)")
    ap.add_argument("--out", default=str(HERE / "results" / "cache_warm.json"))
    args = ap.parse_args(argv)

    inproc = None
    if args.inproc_pairs:
        inproc = inproc_pairs(config(args.preset, args.seq_len, args.gpus, args.n_layers,
                                     tempfile.gettempdir()), args.inproc_pairs)

    import ray

    import simdist

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", configure_logging=False)
    labels = ["cold", "warm", "cold_driver", "warm_driver", "off"]
    samples: dict[str, list[dict]] = {k: [] for k in labels}
    codec_fig = None
    try:
        for rep in range(args.repeats):
            dirs = [tempfile.mkdtemp(prefix="simdist-cache-") for _ in range(2)]
            try:
                runs = [("cold", True, "actor", 0), ("warm", True, "actor", 0),
                        ("cold_driver", True, "driver", 1), ("warm_driver", True, "driver", 1),
                        ("off", False, "actor", 0)]
                if rep % 2:  # alternate which placement goes first
                    runs = runs[2:4] + runs[0:2] + runs[4:]
                for label, use, placement, di in runs:
                    cfg = config(args.preset, args.seq_len, args.gpus, args.n_layers, dirs[di])
                    r = one_run(cfg, use, args.workers, placement)
                    samples[label].append(r)
                    c = r["cache"]
                    cpu = f"{r['rank_cpu_s']:.2f}" if r["rank_cpu_s"] is not None else "-"
                    print(f"  {rep + 1} {label:11}: wall {r['wall_s']:6.2f} s  ranks "
                          f"{', '.join(f'{w:.2f}' for w in r['rank_wall_s'])} s (cpu {cpu} s)  hits {c['hits']} "
                          f"misses {c['misses']} bypasses {c['bypasses']} hit rate "
                          f"{c['hit_rate']:.3f}  loaded {c.get('loaded', '-')}  store "
                          f"{c.get('size', '-')} entries  load "
                          f"{r['loadavg_1m'][0]:.1f}->{r['loadavg_1m'][1]:.1f}", flush=True)
                if codec_fig is None:
                    codec_fig = codec_figures(dirs[0])
            finally:
                for d in dirs:
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        ray.shutdown()

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in samples[label])

    def med_rank(label: str) -> float:
        return statistics.median(sum(r["rank_wall_s"]) for r in samples[label])

    result = {
        "benchmark": "cache_warm",
        "plan": {"preset": args.preset, "n_layers": args.n_layers, "seq_len": args.seq_len,
                 "parallel": f"FSDP dp_shard={args.gpus}", "gpu": "h100-sxm",
                 "workers": args.workers},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"simdist": simdist.__version__, "torch": __import__("torch").__version__,
                     "ray": ray.__version__},
        "statistic": f"median of {args.repeats} sample(s)",
        "wall_s": {k: med(k, "wall_s") for k in samples},
        "rank_wall_s": {k: med_rank(k) for k in samples},
        "rank_cpu_s": {k: statistics.median(x["rank_cpu_s"] for x in samples[k]) for k in samples
                       if all(x["rank_cpu_s"] is not None for x in samples[k])},
        "samples": samples,
        "codec": codec_fig,
        "in_process": inproc,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    cold, warm = samples["cold"][0]["cache"], samples["warm"][0]["cache"]
    print()
    print(f"{args.preset} FSDP {args.gpus} GPUs seq {args.seq_len} ({result['statistic']}, "
          f"{os.cpu_count()} CPUs)")
    for k in labels:
        c = samples[k][0]["cache"]
        cpu = result["rank_cpu_s"].get(k)
        print(f"  {k:11}: wall {result['wall_s'][k]:6.2f} s  rank sim {result['rank_wall_s'][k]:6.2f} s"
              f" (cpu {'-' if cpu is None else f'{cpu:.2f}'} s)"
              f"  hit rate {c['hit_rate']:.3f} (hits {c['hits']}, misses {c['misses']})")
    print(f"  cold run wrote {cold['new_entries']} entries ({cold['store']['bytes']} bytes, "
          f"{cold['store']['files']} files, dump {cold['store']['dump_ms']:.0f} ms, encode "
          f"{cold['store']['encode_ms']:.0f} ms in workers)")
    print(f"  warm run loaded {warm['loaded']} entries (service load {warm['store']['load_ms']:.0f} ms,"
          f" worker decode+install {warm['store']['worker_load_ms']:.0f} ms)")
    print(f"  codec alone: {json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in codec_fig.items()})}")
    if inproc:
        print(f"  in-process rank alone ({args.inproc_pairs} pairs): cold {inproc['median_cold_s']:.2f} s"
              f" (cpu {inproc['median_cold_cpu_s']:.2f} s), warm {inproc['median_warm_s']:.2f} s (cpu "
              f"{inproc['median_warm_cpu_s']:.2f} s), median paired saving "
              f"{inproc['median_paired_saving_s']:.3f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
