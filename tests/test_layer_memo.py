"""The layer memo (simdist/mode/layer_memo.py) against full execution of the same rank: every
field and every row of the ops, collectives and memory tables must be identical."""

from __future__ import annotations

import pytest

from conftest import make_task, run_rank, spec
from simdist.mode.layer_memo import memo_shape
from simdist.trace import RankTask

FIELDS = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes", "peak_phase", "peak_module", "flops", "model_flops", "hbm_bytes",
          "comm_bytes", "executed_microbatches")


def assert_same(model, **kw) -> None:  # noqa: ANN001
    full = run_rank(model, layer_memo=False, **kw)
    memo = run_rank(model, **kw)
    assert full.layer_memo == "full"
    assert memo.layer_memo == "memo", "the memo did not apply (fell back to full execution)"
    for f in FIELDS:
        assert getattr(memo, f) == getattr(full, f), f
    for table in ("ops", "collectives", "memory", "kernels"):
        a, b = getattr(full, table), getattr(memo, table)
        assert a.num_rows == b.num_rows, table
        assert a.equals(b), f"{table} rows differ"


def test_llama_fsdp_two_microbatches_equals_full_execution() -> None:
    # 12 blocks: two-digit indices (module attribution must order layers.10 after layers.9)
    assert_same(spec("llama3-debug", n_layers=12), dp_shard=8, num_microbatches=2)


def test_llama_tp_sp_fsdp_full_ac_equals_full_execution() -> None:
    assert_same(spec("llama3-debug", n_layers=7), dp_shard=2, tp=2,
                activation_checkpointing="full")


def test_gpt_eager_tp_selective_equals_full_execution() -> None:
    assert_same(spec("gpt-debug", n_layers=8, attention="eager"), tp=2, dp_shard=2,
                activation_checkpointing="selective")


def test_ddp_per_step_four_microbatches_equals_full_execution() -> None:
    # first, middle (weight 2) and last micro-batch differ: no_sync until the last all-reduce
    assert_same(spec("llama3-debug", n_layers=6), dp_replicate=2, num_microbatches=4,
                grad_sync="per_step")


def test_fsdp_per_step_and_hsdp_auto_equal_full_execution() -> None:
    model = spec("gpt-debug", n_layers=6)
    assert_same(model, dp_shard=2, num_microbatches=3, grad_sync="per_step")
    assert_same(model, dp_replicate=2, dp_shard=2, num_microbatches=3)


def test_pipeline_1f1b_middle_stage_equals_full_execution() -> None:
    # stage 1 of 2 holds layers 6..11: module names carry the stage's layer offset
    assert_same(spec("llama3-debug", n_layers=12), pp=2, dp_shard=2, num_microbatches=4, rank=2)


@pytest.mark.slow
def test_interleaved_pipeline_ddp_equals_full_execution() -> None:
    assert_same(spec("llama3-debug", n_layers=24), pp=2, num_microbatches=4, rank=1,
                pp_schedule="interleaved_1f1b")


@pytest.mark.slow
def test_context_parallel_and_zero1_equal_full_execution() -> None:
    model = spec("llama3-debug", n_layers=8)
    assert_same(model, cp=2, dp_shard=2, seq_len=512, rank=1)
    assert_same(model, dp_shard=4, zero_stage=1)


# One small case of each memo kind in the default suite (the larger ones above are -m slow).
# The memo needs at least BASE_LAYERS + 3 = 5 blocks per stage.

def test_small_interleaved_pipeline_equals_full_execution() -> None:
    # pp 2 x 2 virtual stages of 5 blocks: rank 1 holds stages 1 and 3 (the last)
    assert_same(spec("llama3-debug", n_layers=20, seq_len=64), pp=2, num_microbatches=2,
                rank=1, pp_schedule="interleaved_1f1b", seq_len=64)


def test_small_interleaved_pipeline_fsdp_equals_full_execution() -> None:
    # The runtime schedule unshards every FSDP block of a stage up front (its UNSHARD action,
    # outside any module): recorded for each block (mode/pipeline.py: _unshards_by_module),
    # the memo inserts them with the block; recorded for the root, it fell back (a block
    # more changed the root's waits: "delete at 18:19 -> 26:26" in the kernel stream).
    assert_same(spec("llama3-debug", n_layers=20, seq_len=64), pp=2, dp_shard=2,
                num_microbatches=4, rank=1, pp_schedule="interleaved_1f1b", seq_len=64)


def test_small_context_parallel_equals_full_execution() -> None:
    assert_same(spec("llama3-debug", n_layers=5), cp=2, seq_len=256, rank=1)


def test_small_zero1_equals_full_execution() -> None:
    assert_same(spec("llama3-debug", n_layers=5), dp_shard=2, zero_stage=1)


def test_small_zero1_tp_with_megatron_overlap_equals_full_execution() -> None:
    # Megatron's distributed optimizer as it runs with bf16 (fp32 main_grad): the
    # reduce-scatters in the last micro-batch's backward, the all-gathers in the first forward:
    # first, middle and last micro-batch differ
    assert_same(spec("llama3-debug", n_layers=5), tp=2, dp_shard=2, zero_stage=1,
                zero_overlap_grad_reduce=True, zero_overlap_param_gather=True,
                zero_grad_dtype="fp32", num_microbatches=4)


def test_small_memo_fallback_still_answers_exactly() -> None:
    # (see test_memo_reports_fallback_and_still_answers_exactly)
    model = spec("llama3-debug", n_layers=20, seq_len=64)
    kw = dict(pp=2, num_microbatches=2, pp_schedule="zero_bubble", seq_len=64)
    tr = run_rank(model, **kw)
    assert tr.layer_memo == "fallback"
    full = run_rank(model, layer_memo=False, **kw)
    for f in FIELDS:
        assert getattr(tr, f) == getattr(full, f), f
    assert tr.ops.equals(full.ops) and tr.memory.equals(full.memory)


def _task(model, pp: int = 1, **kw) -> RankTask:  # noqa: ANN001
    return make_task(model, pp=pp, seq_len=256, num_microbatches=pp, **kw)


def test_memo_applies_only_to_uniform_deep_stages() -> None:
    assert memo_shape(_task(spec("llama3-debug", n_layers=4))) is None  # too short to gain
    plan = memo_shape(_task(spec("llama3-8b")))
    assert plan.layers_per_stage == 32 and plan.offsets == {0: 0}
    # uneven split: rank 0 (pp stage 0) holds 7 layers of 13, stage 1 holds 6
    plan = memo_shape(_task(spec("llama3-debug", n_layers=13), pp=2))
    assert plan.layers_per_stage == 7 and plan.stages == (0,)
    assert memo_shape(_task(spec("moe-debug", n_layers=8))) is None  # dense first layers


@pytest.mark.slow
def test_memo_reports_fallback_and_still_answers_exactly() -> None:
    # zero-bubble runs attribute no module to ops: the blocks' events are indistinguishable
    # and the a+2 prediction does not hold, so the rank is executed in full
    model = spec("llama3-debug", n_layers=24)
    kw = dict(pp=2, num_microbatches=4, pp_schedule="zero_bubble")
    tr = run_rank(model, **kw)
    assert tr.layer_memo == "fallback"
    full = run_rank(model, layer_memo=False, **kw)
    assert tr.peak_bytes == full.peak_bytes and tr.ops.equals(full.ops)


def test_layer_store_round_trip_rebuilds_without_executing(tmp_path) -> None:
    model = spec("llama3-debug", n_layers=6)
    kw = dict(dp_shard=2, tp=2, num_microbatches=2, layer_cache_dir=str(tmp_path))
    cold = run_rank(model, **kw)
    warm = run_rank(model, **kw)
    assert (cold.layer_memo, cold.blocks_executed, cold.blocks_total) == ("memo", 9, 6)
    assert (warm.layer_memo, warm.blocks_executed) == ("memo-hit", 0)
    assert warm.fake_cache["misses"] == warm.fake_cache["hits"] == 0  # nothing dispatched
    for table in ("ops", "collectives", "memory", "kernels"):
        assert getattr(warm, table).equals(getattr(cold, table))
    # another depth of the same block reuses the stored model
    deeper = run_rank(spec("llama3-debug", n_layers=10), **kw)
    assert deeper.layer_memo == "memo-hit" and deeper.blocks_total == 10
    full = run_rank(spec("llama3-debug", n_layers=10), dp_shard=2, tp=2, num_microbatches=2,
                    layer_memo=False)
    assert deeper.memory.equals(full.memory) and deeper.ops.equals(full.ops)


def test_corrupt_layer_store_file_is_reported_and_ignored(tmp_path) -> None:
    from simdist.cache.layers import LayerStore
    from simdist.cache.store import CacheWarning

    model = spec("llama3-debug", n_layers=6)
    kw = dict(dp_shard=2, num_microbatches=1, layer_cache_dir=str(tmp_path))
    good = run_rank(model, **kw)
    import torch

    (path,) = LayerStore.open(str(tmp_path), torch.__version__).files()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(CacheWarning, match="ignoring"):
        again = run_rank(model, **kw)
    assert again.layer_memo == "memo" and again.memory.equals(good.memory)
    assert (tmp_path / "quarantine" / path.name).exists()


# --- Hugging Face models (simdist/models/hf.py): the memo where every decoder block is the same --

# 7 layers: the memo executes 2, 3 and 4 (BASE_LAYERS + 0..2) and rebuilds 7.
HF_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, head_dim=16)
GPT2_TINY = dict(n_embd=64, n_layer=7, n_head=4, vocab_size=256, n_positions=128,
                 bos_token_id=0, eos_token_id=0)


def _hf(model_type: str, **fields):  # noqa: ANN202
    pytest.importorskip("transformers")
    from simdist.families import hf_spec

    return hf_spec(dict(model_type=model_type, **fields))


def test_hf_llama_fsdp_equals_full_execution() -> None:
    # blocks at hf.model.layers.N
    assert_same(_hf("llama", **HF_TINY), dp_shard=2, seq_len=128)


def test_hf_llama_fsdp_tp_from_its_own_plan_equals_full_execution() -> None:
    # TP2 from LlamaForCausalLM's _tp_plan (colwise q/k/v/gate/up, rowwise o/down)
    assert_same(_hf("llama", **HF_TINY), dp_shard=2, tp=2, seq_len=128)


def test_hf_qwen2_fsdp_full_ac_equals_full_execution() -> None:
    assert_same(_hf("qwen2", **HF_TINY), dp_shard=2, seq_len=128,
                activation_checkpointing="full")


def test_hf_gpt2_fsdp_equals_full_execution() -> None:
    # blocks at hf.transformer.h.N: the memo renumbers GPT-2's own block path
    sp = _hf("gpt2", **GPT2_TINY)
    assert sp.block_path == "hf.transformer.h"
    assert_same(sp, dp_shard=2, seq_len=128)


MOE_TINY = dict(HF_TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def test_hf_qwen3_moe_fsdp_tp_equals_full_execution() -> None:
    # every layer sparse: grouped-GEMM experts, TP from the model's own plan (moe_tp_experts,
    # q_norm / k_norm replicated_with_grad_allreduce)
    from simdist.parallel.tensor_parallel import unsupported_tp_styles

    sp = _hf("qwen3_moe", **MOE_TINY)
    if unsupported_tp_styles(sp.args.tp_plan):
        pytest.skip(f"TP styles not mapped yet: {unsupported_tp_styles(sp.args.tp_plan)}")
    assert_same(sp, dp_shard=2, tp=2, seq_len=128)


@pytest.mark.slow
def test_hf_mixtral_fsdp_equals_full_execution() -> None:
    assert_same(_hf("mixtral", **dict(HF_TINY, num_local_experts=4, num_experts_per_tok=2)),
                dp_shard=2, seq_len=128)


def test_hf_layers_that_differ_get_no_memo() -> None:
    """Qwen2 with max_window_layers=5 of 7: layers 5 and 6 attend through a 32-token sliding
    window, 0-4 fully (transformers' Qwen2Config.layer_types). The memo is refused (the rank
    is executed in full); forced, it would be wrong: its short steps (2-4 layers) are all
    full attention, fit, and rebuild 7 full-attention layers."""
    from dataclasses import replace

    sp = _hf("qwen2", **HF_TINY, use_sliding_window=True, sliding_window=32,
             max_window_layers=5)
    assert not sp.args.identical_blocks
    assert memo_shape(make_task(sp, dp_shard=2, seq_len=128)) is None
    full = run_rank(sp, dp_shard=2, seq_len=128)
    assert full.layer_memo == "full"
    forced = replace(sp, args=replace(sp.args, identical_blocks=True))
    wrong = run_rank(forced, dp_shard=2, seq_len=128)
    assert wrong.layer_memo == "memo" and not wrong.ops.equals(full.ops)


@pytest.mark.parametrize("model_type, fields, identical", [
    # Gemma 3: five sliding-window layers, then a global one (sliding_window_pattern 6)
    ("gemma3_text", dict(HF_TINY, sliding_window=32), False),
    # every Qwen2 layer sliding (max_window_layers 0), at every depth
    ("qwen2", dict(HF_TINY, use_sliding_window=True, sliding_window=32, max_window_layers=0),
     True),
    # an explicit per-layer list: cut to the memo's depths with the layer count
    ("qwen2", dict(HF_TINY, layer_types=["full_attention"] * 7), True),
    ("qwen2", dict(HF_TINY, layer_types=["full_attention"] * 6 + ["sliding_attention"]), False),
    # Qwen3-MoE with a dense layer among the sparse ones
    ("qwen3_moe", dict(MOE_TINY, mlp_only_layers=[3]), False),
    ("qwen3_moe", MOE_TINY, True),
    ("mixtral", dict(HF_TINY, num_local_experts=4, num_experts_per_tok=2), True),
])
def test_hf_identical_blocks(model_type, fields, identical) -> None:  # noqa: ANN001
    sp = _hf(model_type, **fields)
    assert sp.args.identical_blocks is identical
    assert (memo_shape(make_task(sp, dp_shard=2, seq_len=128)) is not None) is identical


def test_hf_memo_depths_are_the_memos() -> None:
    pytest.importorskip("transformers")
    from simdist.mode.layer_memo import BASE_LAYERS
    from simdist.models.hf import MEMO_DEPTHS, config_with_layers

    assert MEMO_DEPTHS == tuple(BASE_LAYERS + i for i in range(3))
    # GPT-2 stores its depth as n_layer (num_hidden_layers is its alias)
    assert config_with_layers(dict(model_type="gpt2", num_hidden_layers=7), 3) == \
        dict(model_type="gpt2", n_layer=3)
    assert config_with_layers(dict(model_type="qwen2", num_hidden_layers=7,
                                   layer_types=["full_attention"] * 7), 2) == \
        dict(model_type="qwen2", num_hidden_layers=2, layer_types=["full_attention"] * 2)


def test_hf_layer_store_key_has_the_config_not_the_depth(tmp_path) -> None:
    """The store key of an hf rank: its config fields (a model that executes differently never
    reads another's model), not its depth (a deeper model of the same blocks reuses it)."""
    from simdist.memo import open_memo

    def key(**fields) -> str:  # noqa: ANN003
        task = make_task(_hf("llama", **{**HF_TINY, **fields}), dp_shard=2, seq_len=128,
                         layer_cache_dir=str(tmp_path))
        return open_memo(task).key

    assert key() == key(num_hidden_layers=9)
    assert key() != key(hidden_act="gelu")
    assert key() != key(rms_norm_eps=1e-5)


def test_hf_layer_store_rebuilds_a_deeper_model_without_executing(tmp_path) -> None:
    kw = dict(dp_shard=2, seq_len=128, layer_cache_dir=str(tmp_path))
    cold = run_rank(_hf("llama", **HF_TINY), **kw)
    assert cold.layer_memo == "memo"
    deeper = _hf("llama", **dict(HF_TINY, num_hidden_layers=9))
    warm = run_rank(deeper, **kw)
    assert (warm.layer_memo, warm.blocks_executed, warm.blocks_total) == ("memo-hit", 0, 9)
    full = run_rank(deeper, dp_shard=2, seq_len=128, layer_memo=False)
    for table in ("ops", "collectives", "memory", "kernels"):
        assert getattr(warm, table).equals(getattr(full, table)), table
