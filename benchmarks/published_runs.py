"""Every row of the calibration set (tests/published_runs.py) simulated with the built-in
constants; prints predicted vs published and writes benchmarks/results/published_runs.json.

    python benchmarks/published_runs.py                # every row (the pipelined ones take long)
    python benchmarks/published_runs.py --only 1.7B 7.5B
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "published_runs.json"))
    args = ap.parse_args()
    import ray

    from published_runs import ROWS, predicted
    from simdist.config import load_config
    from simdist.coordinator import simulate

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out = []
    for row in ROWS:
        if args.only and not any(o in row.name for o in args.only):
            continue
        t0 = time.perf_counter()
        s = simulate(load_config(row.config)).summary
        pred = predicted(row, s)
        rec = dict(name=row.name, metric=row.metric, published=row.published, predicted=pred,
                   error=pred / row.published - 1, step_time_s=s["step_time_s"],
                   bottleneck=s["bottleneck"], assumptions=row.assumptions,
                   sim_wall_s=time.perf_counter() - t0)
        out.append(rec)
        print(f"{row.name:45s} {pred:9.1f} vs {row.published:9.1f}  {100 * rec['error']:+6.1f}%"
              f"  {s['bottleneck']}  ({rec['sim_wall_s']:.0f} s)", flush=True)
    ray.shutdown()
    errs = [abs(r["error"]) for r in out]
    if errs:
        print(f"mean |error| {100 * sum(errs) / len(errs):.1f}%  max {100 * max(errs):.1f}%")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
