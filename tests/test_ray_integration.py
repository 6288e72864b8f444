"""End-to-end runs of `simdist.coordinator.simulate` on a real local Ray (2 CPUs).

One Ray for the whole module (~4 s); `simulate` finds it initialised and reuses it instead of
starting its own (coordinator.ray_session). Every plan uses `llama3-debug` at seq_len 128, so a
class simulates in about a second and most of each test is actor start-up.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pyarrow.compute as pc
import pytest

import ray  # a hard dependency (pyproject): missing, the tests must fail, not skip

from simdist.config import load_config  # noqa: E402
from simdist.coordinator import simulate, simulate_async  # noqa: E402

# ranks.parquet columns, in the order DESIGN.md lists them.
RANK_COLUMNS = [
    "rank", "node", "local_rank",
    "dp_replicate", "dp_shard", "cp", "tp", "pp", "ep",
    "class_id", "peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
    "other_bytes", "flops", "hbm_bytes", "comm_bytes", "compute_s", "comm_s", "exposed_comm_s",
    "bubble_s", "step_s", "fits",
]
# What a rank measured (everything but its identity and its class number).
MEASURED = [c for c in RANK_COLUMNS if c not in
            ("rank", "node", "local_rank", "dp_replicate", "dp_shard", "cp", "tp", "pp", "ep",
             "class_id")]
MEASURED_INT = [c for c in MEASURED if not c.endswith("_s")]  # exact; times are sums of floats


def cfg(*, vocab_size: int | None = None, dp_replicate: int = 1, seq_len: int = 128):
    model = {"preset": "llama3-debug"}
    if vocab_size is not None:
        model["vocab_size"] = vocab_size
    return load_config({
        "model": model,
        "training": {"seq_len": seq_len, "micro_batch": 1},
        "parallel": {"dp_replicate": dp_replicate, "dp_shard": -1},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 1},
    })


@pytest.fixture(scope="module")
def local_ray():
    assert not ray.is_initialized(), "another test left Ray running"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _partition(labels: list) -> set[frozenset[int]]:
    """Ranks grouped by label (index = rank), as a set of blocks: numbering-free."""
    blocks: dict = defaultdict(set)
    for rank, label in enumerate(labels):
        blocks[label].add(rank)
    return {frozenset(b) for b in blocks.values()}


CLASS_TABLES = ("ops", "collectives", "memory")


def _class_rows(plan, name: str, class_id: int) -> list[dict]:
    """One class's rows of `plan.<name>` (ops / collectives / memory), without the class number.
    Module attribution is part of the comparison: StepContext.module() breaks ties between
    sibling modules open together in backward by name, so it does not depend on the process."""
    table = getattr(plan, name)
    return table.filter(pc.equal(table["class_id"], class_id)).drop_columns(["class_id"]).to_pylist()


def _same_row(a: dict, b: dict) -> bool:
    """Equal integers and flags; times equal up to float summation order."""
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, float):
            if va != pytest.approx(vb, rel=1e-9, abs=1e-15):
                return False
        elif va != vb:
            return False
    return True


def assert_classes_match_exhaustive(by_class, exhaustive) -> None:
    world = by_class.summary["world_size"]
    assert exhaustive.summary["world_size"] == world
    assert exhaustive.summary["simulated_ranks"] == world
    assert by_class.summary["simulated_ranks"] == by_class.summary["rank_classes"] < world

    a, b = by_class.ranks.to_pylist(), exhaustive.ranks.to_pylist()
    assert [r["rank"] for r in a] == [r["rank"] for r in b] == list(range(world))
    for ra, rb in zip(a, b):  # row for row, every column but the class number
        ra = {k: v for k, v in ra.items() if k != "class_id"}
        rb = {k: v for k, v in rb.items() if k != "class_id"}
        assert _same_row(ra, rb), f"rank {ra['rank']}: {ra} != {rb}"

    # Exhaustive runs give every rank its own class (class_id == rank), so the partition to
    # compare is by content: grouping the exhaustive rows by what they measured must give the
    # class run's partition exactly (the classes are sound and none is split needlessly).
    classes = _partition([r["class_id"] for r in a])
    measured = _partition([tuple(r[c] for c in MEASURED_INT) for r in b])
    assert classes == measured

    # Deeper than the per-rank numbers: every member of a class executed the same ops,
    # collectives and memory timeline as the class's representative.
    for r in a:
        for name in CLASS_TABLES:
            ours = _class_rows(by_class, name, r["class_id"])
            theirs = _class_rows(exhaustive, name, r["rank"])  # exhaustive: class_id == rank
            assert len(ours) == len(theirs) > 0, f"{name} of rank {r['rank']}"
            for x, y in zip(ours, theirs):
                assert _same_row(x, y), f"{name} of rank {r['rank']}: {x} != {y}"


def test_fsdp_8_gpus(local_ray):
    plan = simulate(cfg())
    s = plan.summary
    assert plan.ranks.num_rows == 8
    assert sorted(plan.ranks.column_names) == sorted(RANK_COLUMNS)
    assert plan.ranks["rank"].to_pylist() == list(range(8))
    assert plan.ranks["dp_shard"].to_pylist() == list(range(8))
    assert s["world_size"] == 8
    assert s["rank_classes"] == 1 and s["simulated_ranks"] == 1
    assert s["fits"] is True and plan.fits
    assert all(plan.ranks["fits"].to_pylist())
    assert s["model_flops_per_step"] > 0
    assert s["peak_bytes_max"] == max(plan.ranks["peak_bytes"].to_pylist()) > 0
    assert s["step_time_s"] > 0 and 0 < s["mfu"] < 1
    ex = s["execution"]
    assert ex["nodes"] >= 1 and ex["actors"] >= 1
    assert ex["ray_address"] == local_ray  # joined the fixture's Ray, did not start its own
    assert ray.is_initialized()  # ...and left it running


def test_uneven_fsdp_classes_match_exhaustive(local_ray):
    # vocab 2050 over dp_shard 8: torch.chunk gives 7 shards of 257 rows and one of 251.
    c = cfg(vocab_size=2050)
    by_class = simulate(c)
    assert by_class.summary["rank_classes"] == 2
    peaks = set(by_class.ranks["peak_bytes"].to_pylist())
    assert len(peaks) >= 2
    exhaustive = simulate(c, exhaustive=True)
    assert exhaustive.summary["execution"]["exhaustive"] is True
    assert set(exhaustive.ranks["peak_bytes"].to_pylist()) == peaks
    assert_classes_match_exhaustive(by_class, exhaustive)


def test_hsdp_classes_match_exhaustive(local_ray):
    # dp_replicate 2 x dp_shard 4: replicas are one class; vocab 2050 / 4 -> 513,513,513,511.
    c = cfg(vocab_size=2050, dp_replicate=2)
    assert (c.parallel.dp_replicate, c.parallel.dp_shard) == (2, 4)
    by_class = simulate(c)
    assert by_class.summary["rank_classes"] == 2
    assert _partition(by_class.ranks["class_id"].to_pylist()) == \
        {frozenset({0, 1, 2, 4, 5, 6}), frozenset({3, 7})}
    exhaustive = simulate(c, exhaustive=True)
    assert_classes_match_exhaustive(by_class, exhaustive)


@pytest.mark.asyncio
async def test_simulate_async(local_ray):
    # Two plans at once on one event loop; each gets its own actor (1 CPU of the 2).
    fsdp, hsdp = await asyncio.gather(simulate_async(cfg()), simulate_async(cfg(dp_replicate=2)))
    for plan in (fsdp, hsdp):
        assert plan.ranks.num_rows == 8
        assert plan.summary["rank_classes"] == 1
        assert plan.fits
    assert hsdp.ranks["dp_replicate"].to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # Same model and tokens per rank; HSDP shards over 4 instead of 8, so it holds more.
    assert hsdp.summary["peak_bytes_max"] > fsdp.summary["peak_bytes_max"]
    assert hsdp.summary["model_flops_per_step"] == fsdp.summary["model_flops_per_step"]


def test_layer_memo_through_the_actor_pool_and_rebuilt_equals_full_execution(local_ray, tmp_path):
    # 6 blocks (memo applies) and vocab 2050 over 8 ranks (2 classes): each class is three
    # short executions and a build, spread over the pool; --no-cache executes every block.
    c = load_config({
        "model": {"preset": "llama3-debug", "n_layers": 6, "vocab_size": 2050},
        "training": {"seq_len": 128, "micro_batch": 1},
        "parallel": {"dp_shard": -1},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 1},
        "simulation": {"cache_dir": str(tmp_path / "c")},
    })
    memo = simulate(c)
    rebuilt = simulate(c)  # both models stored: nothing executes
    full = simulate(c, use_cache=False)
    layer = memo.summary["cache"]["layer"]
    assert (layer["misses"], layer["hits"], layer["fallbacks"]) == (2, 0, 0)
    assert layer["blocks_executed"] == 2 * 9 and layer["blocks_total"] == 2 * 6
    assert memo.summary["execution"]["actors"] == 2  # 6 short executions: one actor per CPU
    layer = rebuilt.summary["cache"]["layer"]
    assert (layer["misses"], layer["hits"], layer["blocks_executed"]) == (0, 2, 0)
    # no actor started: the driver's node rebuilt both classes
    assert (rebuilt.summary["execution"]["actors"], rebuilt.summary["execution"]["nodes"]) == (0, 1)
    assert rebuilt.summary["cache"]["enabled"] and rebuilt.summary["cache"]["misses"] == 0
    assert full.summary["cache"]["layer"]["full"] == 2
    b = full.ranks.to_pylist()
    assert len(b) == 8
    for plan in (memo, rebuilt):
        a = plan.ranks.to_pylist()
        for ra, rb in zip(a, b, strict=True):
            assert _same_row(ra, rb), f"rank {ra['rank']}: {ra} != {rb}"
        for cls in {r["class_id"] for r in a}:
            for name in CLASS_TABLES:
                ours, theirs = _class_rows(plan, name, cls), _class_rows(full, name, cls)
                assert len(ours) == len(theirs) > 0
                assert all(_same_row(x, y) for x, y in zip(ours, theirs)), f"{name}, {cls}"


def test_pipeline_memo_through_the_actor_pool_and_rebuilt_equals_full_execution(local_ray,
                                                                                  tmp_path):
    # Interleaved 1F1B over 2 pipeline ranks (4 stages of 1 block: no layer memo), 18
    # micro-batches: each class executes 3 and 4 micro-batches (fit) and 6 (verify) on the pool
    # and is built there; the second run reads both models back; --no-cache executes all 18.
    c = load_config({
        "model": {"preset": "llama3-debug", "n_layers": 4},
        "training": {"seq_len": 64, "micro_batch": 1, "global_batch": 18},
        "parallel": {"dp_shard": 1, "pp": 2, "pp_schedule": "interleaved_1f1b"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 2, "nodes": 1},
        "simulation": {"cache_dir": str(tmp_path / "c")},
    })
    memo = simulate(c)
    rebuilt = simulate(c)
    full = simulate(c, use_cache=False)
    assert memo.summary["cache"]["pipeline"]["misses"] == 2
    assert rebuilt.summary["cache"]["pipeline"]["hits"] == 2
    assert full.summary["cache"]["pipeline"]["off"] == 2
    b = full.ranks.to_pylist()
    assert len(b) == 2 and full.summary["step_time_s"] == memo.summary["step_time_s"]
    for plan in (memo, rebuilt):
        a = plan.ranks.to_pylist()
        for ra, rb in zip(a, b, strict=True):
            assert _same_row(ra, rb), f"rank {ra['rank']}: {ra} != {rb}"
        for cls in {r["class_id"] for r in a}:
            for name in (*CLASS_TABLES, "kernels"):
                ours, theirs = _class_rows(plan, name, cls), _class_rows(full, name, cls)
                assert len(ours) == len(theirs) > 0
                assert all(_same_row(x, y) for x, y in zip(ours, theirs)), f"{name}, {cls}"
