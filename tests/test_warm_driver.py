"""A run whose every class is in the layer store rebuilds in the driver: no Ray, no actor, at
any class count; its rows equal the run that stored the models (and, for a plan that shares
another plan's models through the execution key, that plan's own full execution)."""

from __future__ import annotations

import pytest

from simdist.calibrate import calibration_for
from simdist.config import load_config
from simdist.coordinator import simulate
from simdist.memo import simulate_rank
from simdist.plan import ClusterPlan, merge
from simdist.planner import plan_run

TABLES = ("ranks", "ops", "collectives", "memory", "kernels")


def _here(config: dict, use_cache: bool = True) -> ClusterPlan:
    """The plan in this process (the memo protocol on a local pool, the layer store in
    `simulation.cache_dir`), merged as `simdist run` merges it."""
    cfg = load_config(config)
    run = plan_run(cfg, use_cache=use_cache)
    traces = [simulate_rank(t) for t in run.tasks]
    return merge(run, traces, {"flops_per_token": run.flops_per_token}, calibration_for(cfg))


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any start of Ray or of an actor fails the test."""
    import simdist.coordinator as coordinator
    import simdist.workers.pool as pool

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a warm run started Ray or an actor")

    monkeypatch.setattr(coordinator, "ray_session", refuse)
    monkeypatch.setattr(pool, "start_workers", refuse)


def _rows(plan: ClusterPlan, table: str) -> list[dict]:
    # times: equal up to float summation order; everything else exactly
    return [{k: pytest.approx(v, rel=1e-12, abs=1e-15) if isinstance(v, float) else v
             for k, v in row.items()} for row in getattr(plan, table).to_pylist()]


def _assert_same_rows(a: ClusterPlan, b: ClusterPlan) -> None:
    for table in TABLES:
        x, y = getattr(a, table), getattr(b, table)
        assert x.num_rows == y.num_rows > 0, table
        assert _rows(a, table) == y.to_pylist(), f"{table} rows differ"


def _hsdp(tmp_path, replicas: int) -> dict:  # noqa: ANN001
    # vocab 2051 over dp_shard 2: shards of 1026 and 1025 rows, two classes
    return {"model": {"preset": "llama3-debug", "n_layers": 6, "vocab_size": 2051},
            "training": {"seq_len": 128, "micro_batch": 1, "global_batch": 2 * replicas * 2},
            "parallel": {"dp_replicate": replicas, "dp_shard": 2},
            "cluster": {"gpu": "h100-sxm", "gpus_per_node": 2, "nodes": replicas},
            "simulation": {"cache_dir": str(tmp_path / "cache")}}


def _no_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any rebuild from a memo model fails the test (the rank must be read as kept)."""
    from simdist.memo import MemoJob

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a rank was rebuilt from its model, not read as kept")

    monkeypatch.setattr(MemoJob, "build", refuse)


def test_plan_reusing_another_plans_models_runs_without_ray_and_equals_full(
        tmp_path, monkeypatch) -> None:
    # HSDP 2 x 2 on 2 nodes stores both classes' models; HSDP 4 x 2 on 4 nodes (the same
    # micro-batches per replica) has the same execution keys: nothing executes, no Ray starts,
    # and its rows equal its own execution of every block.
    stored = _here(_hsdp(tmp_path, 2))
    assert stored.summary["rank_classes"] == 2
    _no_ray(monkeypatch)
    warm = simulate(load_config(_hsdp(tmp_path, 4)))  # rebuilt from the models, then kept
    s = warm.summary
    assert (s["execution"]["actors"], s["execution"]["ray"]) == (0, False)
    assert (s["cache"]["layer"]["hits"], s["cache"]["layer"]["blocks_executed"]) == (2, 0)
    assert s["world_size"] == 8 and s["rank_classes"] == 2
    # The ranks kept rebuilt are read as they are, their replicate groups relabelled: for
    # the first plan (2 replicas: equal to its own cold run) and for the second again.
    _no_rebuild(monkeypatch)
    _assert_same_rows(simulate(load_config(_hsdp(tmp_path, 2))), stored)
    again = simulate(load_config(_hsdp(tmp_path, 4)))
    _assert_same_rows(again, warm)
    monkeypatch.undo()
    full = _here(_hsdp(tmp_path, 4), use_cache=False)
    _assert_same_rows(warm, full)


# 9 classes: every cp rank its own (ring attention's steps differ by cp rank); FSDP over the 9
# cp ranks holds no empty shard (parallel/classes.py).
MANY_CLASSES = {"model": {"preset": "llama3-debug", "n_layers": 5},
                "training": {"seq_len": 576},
                "parallel": {"cp": 9, "dp_shard": 1},
                "cluster": {"gpu": "h100-sxm", "gpus_per_node": 9, "nodes": 1}}


@pytest.mark.slow
def test_warm_run_of_more_than_eight_classes_starts_no_actor(tmp_path, monkeypatch) -> None:
    config = dict(MANY_CLASSES, simulation={"cache_dir": str(tmp_path / "cache")})
    cold = _here(config)
    assert cold.summary["rank_classes"] == 9
    assert {tr.layer_memo for tr in cold.traces.values()} == {"memo"}
    _no_ray(monkeypatch)
    warm = simulate(load_config(config))
    assert warm.summary["execution"]["actors"] == 0
    assert warm.summary["cache"]["layer"]["hits"] == 9
    _assert_same_rows(warm, cold)


def test_rebuilt_rank_entry_round_trips_and_a_corrupt_one_is_a_reported_miss(tmp_path) -> None:
    import pyarrow as pa

    from simdist.cache.layers import LayerStore
    from simdist.cache.store import CacheWarning

    store = LayerStore.open(str(tmp_path), "2.13.0")
    key = store.rebuilt_key("model key", "MemoShape(...)")
    tables = {"ops": pa.table({"op": ["mm", "add"], "count": [3, 1]}),
              "kernels": pa.table({"row": pa.array([0, 1, -1], pa.int32())})}
    fields = {"peak_bytes": 2**40 + 1, "peak_module": "layers.3.attention"}
    store.put_tables(key, tables, fields)
    got_tables, got_fields = store.get_tables(key)
    assert got_fields == fields and set(got_tables) == set(tables)
    assert all(got_tables[n].equals(t) for n, t in tables.items())
    assert store.get_tables(store.rebuilt_key("model key", "another depth")) is None
    assert store.usage()[0] == 0  # a rebuilt rank is not a model
    (path,) = store.files(rebuilt=True)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(CacheWarning, match="ignoring"):
        assert store.get_tables(key) is None
    assert not path.exists() and (tmp_path / "quarantine" / path.name).exists()
