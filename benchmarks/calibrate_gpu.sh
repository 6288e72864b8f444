#!/usr/bin/env bash
# `simdist calibrate --quick` on this machine's GPU(s), then the key constants next to the
# defaults and the measured rows the model misses most. Under 5 minutes on one H200 (about one
# minute of it measuring; with several GPUs add the NCCL sweeps, two spawns of one process per
# GPU). Needs torch with CUDA, numpy and pyarrow; not pydantic or Ray.
#
#     bash benchmarks/calibrate_gpu.sh [--gpu NAME]       # other arguments go to calibrate
#
# Writes $OUT/calibration-quick.parquet (the table: `cluster.calibration: PATH`) and
# $OUT/calibration-quick.json (raw measurements, fitted values, defaults, model error per row);
# $OUT defaults to benchmarks/results/. Exit status: calibrate's (2: no CUDA GPU).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv 2>/dev/null || true
table="$out/calibration-quick.parquet"
timeout 280 "$py" -m simdist.cli calibrate --quick --out "$table" "$@"
rc=$?
[ $rc -eq 0 ] || { echo "simdist calibrate exited $rc"; exit $rc; }
"$py" - "$out/calibration-quick.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d = r["device"]
print(f"\n{d['name']} x{d['device_count']}  torch {d['torch']}  CUDA {d['cuda']}  NCCL {d['nccl']}")
print(f"{'key':34s} {'measured':>12s} {'default':>12s}")
for k, v in r["fitted"].items():
    print(f"{k:34s} {v:12.6g} {r['defaults'][k]:12.6g}")
worst = sorted((c for c in r["check"] if c["rel_err"] is not None), key=lambda c: -abs(c["rel_err"]))
print("rows the fitted model misses most (model / measured - 1):")
for c in worst[:8]:
    what = c.get("shapes") or f"{c['kind']} {c['algo']} {c['nbytes']} B"
    print(f"  {c.get('role', 'collective'):10s} {c.get('op', ''):40.40s} {what:48.48s} "
          f"{c['time_s'] * 1e6:10.1f} us  {c['rel_err']:+.1%}")
PY
