"""The layer store's key (simdist/execution_key.py): every field the recorded events depend on
changes it; the fields that do not (the replicate degree beyond "replicated", the rank number
of a mesh position, the global batch, compile, the cluster) leave it, and a model stored by
one plan and rebuilt for another of the same key equals that other plan's full execution row
for row."""

from __future__ import annotations

import pytest
import torch

from conftest import make_task, run_rank, spec
from simdist.cache.layers import LayerStore
from simdist.execution_key import execution_signature
from simdist.mode.layer_memo import BASE_LAYERS, memo_shape
from test_layer_memo import FIELDS

BASE = dict(dp_shard=2, tp=2, num_microbatches=2, seq_len=256)


def _key(model, tmp_path, **kw) -> str:  # noqa: ANN001
    """The store key the memo would use for this task (its BASE_LAYERS-block short task)."""
    task = make_task(model, **{**BASE, **kw})
    shape = memo_shape(task)
    short = shape.reduced(task, BASE_LAYERS) if shape is not None else task
    return LayerStore.open(str(tmp_path), torch.__version__).key(execution_signature(short))


def test_layer_store_key_sensitivity(tmp_path, monkeypatch) -> None:
    model = spec("llama3-debug", n_layers=6)
    base = _key(model, tmp_path)
    # Each field execution reads (mode/rank.py: execute_rank) gives another key.
    changed = dict(dtype="fp32", seq_len=128, micro_batch=2, activation_checkpointing="full",
                   optimizer="sgd", grad_sync="per_step", tp=1, dp_shard=4, dp_replicate=2,
                   sequence_parallel=False, zero_stage=1, num_microbatches=3)
    keys = {name: _key(model, tmp_path, **{name: value}) for name, value in changed.items()}
    # Megatron's distributed-optimizer flags (ZeRO-1 only)
    for flag in ("zero_overlap_grad_reduce", "zero_overlap_param_gather"):
        keys[flag] = _key(model, tmp_path, zero_stage=1, **{flag: True})
    keys["zero_grad_dtype"] = _key(model, tmp_path, zero_stage=1, zero_grad_dtype="fp32")
    for name, key in keys.items():
        assert key != base, f"{name} does not change the layer store key"
    assert len(set(keys.values())) == len(keys)  # and no two changes collide
    # the model's shape (another width) and attention kernel
    assert _key(spec("llama3-debug", n_layers=6, dim=512), tmp_path) != base
    assert _key(spec("llama3-debug", n_layers=6, attention="eager"), tmp_path,
                attention="eager") != base
    # the rank's place: pipeline stage, context-parallel rank
    assert (_key(spec("llama3-debug", n_layers=12), tmp_path, pp=2, rank=0)
            != _key(spec("llama3-debug", n_layers=12), tmp_path, pp=2, rank=4))
    assert (_key(model, tmp_path, cp=2, tp=1, rank=0)
            != _key(model, tmp_path, cp=2, tp=1, rank=1))
    # MoE routing (the spec carries it), and a routing file's contents, not only its path
    moe = {r: _key(spec("moe-debug", routing=r), tmp_path, routing=r)
           for r in ("balanced", "zipf:1.2")}
    assert moe["balanced"] != moe["zipf:1.2"]
    loads = tmp_path / "loads.json"
    loads.write_text("[1, 1, 1, 1]")
    route = f"file:{loads}"
    first = _key(spec("moe-debug", routing=route), tmp_path, routing=route)
    loads.write_text("[4, 3, 2, 1]")
    assert _key(spec("moe-debug", routing=route), tmp_path, routing=route) != first
    # the simdist source that executes ranks
    import simdist.cache.layers as layers

    monkeypatch.setattr(layers, "source_digest", lambda: "another source")
    assert _key(model, tmp_path) != base


def test_layer_store_key_leaves_out_what_execution_does_not_read(tmp_path) -> None:
    model = spec("llama3-debug", n_layers=6)
    # global_batch (execution reads the micro-batch count) and compile (a cost-model input)
    assert _key(model, tmp_path, global_batch=64, compile=True) == _key(model, tmp_path)
    # replicas: the degree beyond "replicated" (relabelled group sizes, tested below)
    assert (_key(model, tmp_path, dp_replicate=2) == _key(model, tmp_path, dp_replicate=4)
            != _key(model, tmp_path, dp_replicate=1))
    # one mesh position, two rank numbers: stage 1's first rank is pp x (dp_replicate x
    # dp_shard x tp) = 1 x 8 = rank 8 with dp_replicate 2, rank 16 with 4
    deep = spec("llama3-debug", n_layers=12)
    assert (_key(deep, tmp_path, pp=2, dp_replicate=2, rank=8)
            == _key(deep, tmp_path, pp=2, dp_replicate=4, rank=16))


def _assert_same(a, b) -> None:  # noqa: ANN001
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    for table in ("ops", "collectives", "memory", "kernels"):
        x, y = getattr(a, table), getattr(b, table)
        assert x.num_rows == y.num_rows and x.equals(y), f"{table} rows differ"


@pytest.mark.parametrize("stored, reused", [
    # DDP (per-step all-reduce over dp_replicate) recorded with 2 replicas, rebuilt for 4
    (dict(dp_replicate=2, dp_shard=1, tp=1), dict(dp_replicate=4, dp_shard=1, tp=1)),
    # HSDP: the shard reduce-scatter per micro-batch, the replicate all-reduce once; 2 -> 3
    (dict(dp_replicate=2, dp_shard=2, tp=1), dict(dp_replicate=3, dp_shard=2, tp=1)),
    # a pipeline's last stage under DDP x TP: rank 4 of 2 x 2 x 2, rank 8 of 2 x 4 x 2
    (dict(pp=2, dp_replicate=2, dp_shard=1, rank=4), dict(pp=2, dp_replicate=4, dp_shard=1,
                                                          rank=8)),
])
def test_plans_sharing_a_key_equal_their_own_full_execution(tmp_path, stored, reused) -> None:
    n_layers = 12 if "pp" in stored else 6
    model = spec("llama3-debug", n_layers=n_layers)
    kw = dict(BASE, layer_cache_dir=str(tmp_path))
    assert _key(model, tmp_path, **stored) == _key(model, tmp_path, **reused)
    cold = run_rank(model, **{**kw, **stored})
    assert cold.layer_memo == "memo"
    warm = run_rank(model, **{**kw, **reused})
    assert (warm.layer_memo, warm.blocks_executed) == ("memo-hit", 0)
    full = run_rank(model, layer_memo=False, **{**BASE, **reused})
    _assert_same(warm, full)
    # the replicate groups carry the reused plan's degree, not the stored one's
    sizes = {r["group_size"] for r in warm.collectives.to_pylist()
             if r["mesh_dim"] == "dp_replicate"}
    assert sizes == {reused["dp_replicate"]}


def test_placement_is_not_an_execution_input() -> None:
    # The same degrees on 2 nodes of 8 GPUs and on 4 nodes of 4 (another GPU model too): the
    # planner's tasks, everything a rank's execution reads, are equal; only the merge prices
    # the placement.
    from simdist.config import load_config
    from simdist.planner import plan_run

    def plan(cluster: dict):  # noqa: ANN202
        return plan_run(load_config({
            "model": {"preset": "llama3-debug", "n_layers": 6}, "training": {"seq_len": 128},
            "parallel": {"tp": 2, "dp_replicate": 2, "dp_shard": 4}, "cluster": cluster}),
            use_cache=False)

    a = plan({"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 2})
    b = plan({"gpu": "a100-80gb", "gpus_per_node": 4, "nodes": 4})
    assert a.tasks == b.tasks and a.classes == b.classes
