"""Rank classes are exact: simulating one representative per class gives the same per-rank rows
as simulating every rank (`exhaustive`), for a 3D plan with an uneven pipeline split and for a
skewed MoE plan; and ranks that differ (stages, hot experts) land in different classes."""

from __future__ import annotations

import pytest
import ray

from simdist.config import load_config
from simdist.coordinator import simulate


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(plan) -> list[dict]:  # noqa: ANN001
    """Rank rows without the class number; float columns (times: sums whose order follows the
    process that priced them) compare within 1e-9 relative, everything else exactly."""
    return [{k: pytest.approx(v, rel=1e-9, abs=1e-15) if isinstance(v, float) else v
             for k, v in row.items()} for row in plan.ranks.drop(["class_id"]).to_pylist()]


def _partition(plan) -> set[frozenset]:  # noqa: ANN001
    groups: dict[int, set] = {}
    for r in plan.ranks.select(["rank", "class_id"]).to_pylist():
        groups.setdefault(r["class_id"], set()).add(r["rank"])
    return {frozenset(g) for g in groups.values()}


CASES = {
    "3d_tp_pp_dp_uneven": dict(
        model={"preset": "llama3-debug", "n_layers": 6},
        training={"seq_len": 128, "micro_batch": 1, "global_batch": 4},
        parallel={"tp": 2, "pp": 2, "dp_shard": -1, "pp_layers": [2, 4]},
        cluster={"gpus_per_node": 8, "nodes": 1},
    ),
    "cp4_uneven_vocab": dict(
        model={"preset": "llama3-debug", "n_layers": 2, "vocab_size": 2050},
        training={"seq_len": 256, "micro_batch": 1, "global_batch": 2},
        parallel={"dp_shard": -1, "cp": 4},
        cluster={"gpus_per_node": 8, "nodes": 1},
    ),
    "moe_zipf_ep4": dict(
        model={"preset": "moe-debug", "n_layers": 2},
        training={"seq_len": 128, "micro_batch": 1, "global_batch": 8, "routing": "zipf:1.2"},
        parallel={"dp_shard": -1, "ep": 4},
        cluster={"gpus_per_node": 8, "nodes": 1},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_class_runs_equal_exhaustive_runs(local_ray, case):
    cfg = load_config(CASES[case])
    by_class = simulate(cfg)
    every = simulate(cfg, exhaustive=True)
    assert by_class.summary["simulated_ranks"] < every.summary["simulated_ranks"] == 8
    assert every.ranks.drop(["class_id"]).to_pylist() == _rows(by_class)
    # the exhaustive run's distinct rows induce exactly the class partition
    distinct: dict[tuple, set] = {}
    for row in every.ranks.to_pylist():
        # integers and flags only: equal float times of two ranks may differ in the last bits
        key = tuple(v for k, v in row.items() if not isinstance(v, float) and k not in (
            "class_id", "rank", "node", "local_rank", "pp", "dp_replicate", "dp_shard", "cp", "tp",
            "ep"))
        distinct.setdefault(key, set()).add(row["rank"])
    assert {frozenset(g) for g in distinct.values()} == _partition(by_class)
    assert len(distinct) >= 2
    if case.startswith("3d"):
        # the 4-layer stage holds more than the 2-layer one
        peaks = {r["pp"]: r["peak_bytes"] for r in every.ranks.to_pylist()}
        assert peaks[1] > peaks[0]
    elif case.startswith("cp"):
        # ring attention: cp ranks do different work; the last FSDP shard of the vocab is short
        assert len({r["hbm_bytes"] for r in every.ranks.to_pylist()}) >= 4
    else:
        # zipf: the EP rank holding expert 0 computes most
        flops = {r["ep"]: r["flops"] for r in every.ranks.to_pylist()}
        assert flops[0] > flops[1] > flops[3]
