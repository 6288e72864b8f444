"""`simdist fit --solve` (#12 item 4): the largest micro-batch or sequence length that fits, from
a symbolic run (or bisection over concrete runs where the step cannot run symbolically).

The independent expectation is a second execution path: the plan simulated concretely at the
answer and at the next valid value (conftest.simulate_here: the planner's tasks through the memo
protocol with every recorder and `summarize`, merged as `simdist run` merges them). It must fit
at max_value and not at the next valid value, and its peaks must be the ones fit.json predicts,
byte for byte. Models are the debug presets cut to 2 layers, on a made-up GPU whose memory
makes the answer a small number."""

from __future__ import annotations

import copy
import json
import random

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from simdist.solve import (dominant, envelope, evaluate, largest_within, nondecreasing,
                           run_fit)

from tests.conftest import simulate_here
from tests.test_cli import QUICKSTART, run_cli


def gpu(hbm_gb: float) -> dict:
    # memory_limit_bytes = hbm_gb x 1e9 - 2^30 (planner.RESERVED_BYTES)
    return dict(name="tiny", bf16_tflops=100, hbm_gb=hbm_gb, hbm_tb_s=1, nvlink_gb_s=100,
                internode_gb_s=50)


def plan(preset: str, *, model: dict | None = None, training: dict | None = None,
         parallel: dict | None = None, hbm_gb: float = 1.2, gpus: int = 2) -> dict:
    return dict(model={"preset": preset, "n_layers": 2, **(model or {})},
                training={"seq_len": 256, "micro_batch": 2, **(training or {})},
                parallel=parallel or {}, cluster=dict(gpus_per_node=gpus, gpu=gpu(hbm_gb)))


def concrete(config: dict, key: str, value: int):  # noqa: ANN201 - simdist.plan.ClusterPlan
    cfg = copy.deepcopy(config)
    section, name = key.split(".")
    cfg[section][name] = value
    return simulate_here(cfg)


def check_against_concrete(config: dict, key: str, data: dict) -> None:
    """fits at max_value, not at the next valid value (max_value + 1 where that is valid), with
    the peaks fit.json states."""
    m = data["max_value"]
    assert m is not None, data.get("reason")
    checks = {c["value"]: c for c in data["check"]}
    nxt = data["next_valid_value"]
    assert nxt is not None and nxt > m
    if nxt != m + 1:  # m + 1 is not a valid value: fit.json says why
        assert checks[m + 1]["valid"] is False and checks[m + 1]["invalid_because"]
    at, after = concrete(config, key, m), concrete(config, key, nxt)
    assert at.fits and not after.fits
    assert checks[m]["fits"] and not checks[nxt]["fits"]
    assert checks[m]["peak_bytes"] == at.summary["peak_bytes_max"]
    assert checks[nxt]["peak_bytes"] == after.summary["peak_bytes_max"]
    assert data["memory_limit_bytes"] == at.summary["memory_limit_bytes"]


def fit(config: dict, key: str) -> dict:
    data = run_fit(config, key, in_process=True).data
    json.dumps(data)  # fit.json is JSON
    return data


# ------------------------------------------------------------------------------------------
# fit agrees with concrete runs: micro-batch and sequence length, llama3 and gpt, FSDP and TP


CASES = {
    # id: (config, key)
    "llama3-fsdp-micro_batch": (plan("llama3-debug", parallel={"dp_shard": 2}),
                                "training.micro_batch"),
    # eager attention: the S x S scores make the peak quadratic in seq_len; sequence parallel
    # makes the valid values the multiples of tp = 2 (so max_value + 1 is not one)
    "gpt-tp-seq_len": (plan("gpt-debug", model={"max_seq_len": 4096},
                            training={"attention": "eager"}, parallel={"tp": 2}),
                       "training.seq_len"),
    "gpt-fsdp-micro_batch": (plan("gpt-debug", parallel={"dp_shard": 2}), "training.micro_batch"),
    # Llama's RoPE tables follow seq_len (max_seq_len sized to it): the symbol sizes them too
    "llama3-tp-seq_len": (plan("llama3-debug", parallel={"tp": 2}), "training.seq_len"),
}
SLOW = {"gpt-fsdp-micro_batch", "llama3-tp-seq_len"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_fit_agrees_with_concrete_runs(case, monkeypatch):
    config, key = CASES[case]
    # FakeTensorMode's process-wide dispatch cache (what the shared cache warms) starts empty and
    # must stay so: the symbolic run uses a cache of its own (its optimizer step alone would add
    # concrete entries here otherwise)
    monkeypatch.setattr(FakeTensorMode, "cache", {})
    data = fit(config, key)
    assert FakeTensorMode.cache == {}
    assert data["method"] == "symbolic", data["fallback_reason"]
    assert len(data["probes"]) == 1  # one execution answers every value
    assert data["dimension"] == key and 2 <= data["max_value"] < 10_000
    (cls,) = data["classes"]
    name = key.split(".")[1]
    assert name in cls["peak_expression"] and cls["peak_latex"]
    if case == "gpt-tp-seq_len":
        assert "seq_len**2" in cls["peak_expression"]
        assert data["next_valid_value"] == data["max_value"] + 2
    check_against_concrete(config, key, data)


def test_fit_with_a_fixed_global_batch_is_constrained_to_its_divisors():
    """global_batch 96 over dp 2: micro_batch must divide 48; the expression would allow more
    than the largest divisor that fits, and fit.json says so."""
    config = plan("llama3-debug", training={"global_batch": 96, "micro_batch": 1},
                  parallel={"dp_shard": 2}, hbm_gb=1.224)
    data = fit(config, "training.micro_batch")
    assert data["method"] == "symbolic"
    assert data["max_value"] in (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
    assert data["validity"]["constrained"]
    assert data["validity"]["largest_fitting_by_expression"] > data["max_value"]
    check_against_concrete(config, "training.micro_batch", data)


def test_nothing_fits_is_a_result():
    config = plan("llama3-debug", hbm_gb=1.1, parallel={"dp_shard": 2})
    data = fit(config, "training.micro_batch")
    assert data["max_value"] is None and "micro_batch = 1" in data["reason"]
    assert not concrete(config, "training.micro_batch", 1).fits


@pytest.mark.slow
def test_gpt_seq_len_with_learned_positions_bisects():
    """GPT's position table is sized to seq_len (max_seq_len unset): a parameter whose size is
    the symbol cannot be FSDP-sharded symbolically, so fit bisects over concrete runs."""
    config = plan("gpt-debug", parallel={"dp_shard": 2})
    data = fit(config, "training.seq_len")
    assert data["method"] == "bisection"
    assert "pos_embeddings.weight" in data["fallback_reason"]
    check_against_concrete(config, "training.seq_len", data)


@pytest.mark.slow
def test_moe_routing_specialises_the_symbol_and_bisects():
    config = plan("moe-debug", training={"seq_len": 128}, parallel={"dp_shard": 2})
    data = fit(config, "training.micro_batch")
    assert data["method"] == "bisection"
    assert "routing.py" in data["fallback_reason"]
    check_against_concrete(config, "training.micro_batch", data)


# ------------------------------------------------------------------------------------------
# The polynomial steps, against brute force


def test_dominant_envelope_and_largest_within_match_brute_force():
    rng = random.Random(12)
    for _ in range(200):
        polys = [tuple(rng.randint(0, 50) for _ in range(rng.randint(1, 3))) for _ in range(8)]
        front = dominant(polys)
        ks = range(1, 60)
        assert all(max(evaluate(p, k) for p in front) == max(evaluate(p, k) for p in polys)
                   for k in ks)
        shown = envelope(front, 1, 59)
        assert all(max(evaluate(p, k) for p in shown) == max(evaluate(p, k) for p in polys)
                   for k in ks)
        limit = rng.randint(0, 40_000)
        brute = max((k for k in ks if all(evaluate(p, k) <= limit for p in polys)), default=0)
        assert largest_within(front, limit, 59) == brute


def test_nondecreasing_is_exact():
    assert nondecreasing((5, 3, 2), 1)
    assert nondecreasing((0, -4, 1), 2)  # k^2 - 4k: p' = 2k - 4 >= 0 from k = 2
    assert not nondecreasing((0, -4, 1), 1)
    assert not nondecreasing((10, -1), 1)


# ------------------------------------------------------------------------------------------
# The command


def test_bad_solve_key_exits_2_naming_the_allowed_keys(tmp_path):
    out = tmp_path / "fit"
    r = run_cli(["fit", str(QUICKSTART), "--solve", "training.global_batch", "--out", str(out)])
    assert r.returncode == 2, r.stderr
    assert "--solve" in r.stderr and "training.micro_batch, training.seq_len" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_fit_out_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = run_cli(["fit", str(QUICKSTART), "--solve", "training.micro_batch", "--out",
                 str(tmp_path)])
    assert r.returncode == 2 and "--out" in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_fit_command_writes_fit_json(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(plan("llama3-debug", parallel={"dp_shard": 2})))
    out = tmp_path / "fit"
    r = run_cli(["fit", str(config), "--solve", "training.micro_batch", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "fit.json").read_text())
    assert data["simdist_version"] and data["method"] == "symbolic"
    assert f"max micro_batch = {data['max_value']}" in r.stdout
    # a second fit replaces the first (a simdist directory)
    r = run_cli(["fit", str(config), "--solve", "training.micro_batch", "--out", str(out),
                 "--quiet"])
    assert r.returncode == 0, r.stderr
