"""Third-party models (issue #13): CUDA semantics for any model at dispatch level
(simdist/mode/cuda.py), Hugging Face transformers from config (simdist/models/hf.py), user
entrypoints with their blocks elsewhere, and ops fake execution cannot run."""

from __future__ import annotations

import collections
import json
import sys

import pytest
from conftest import make_task, spec

from simdist.config import ConfigError, load_config
from simdist.errors import CannotSimulate
from simdist.families import build_model, count_params, entrypoint_spec
from simdist.memo import simulate_rank
from simdist.planner import plan_run

SEQ = 256
LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                 ffn_dim=14336)
HF_LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=False)
MEMORY = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes")



def _op_rows(trace) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for r in trace.ops.to_pylist():
        c[(r["op"], r["phase"], r["flops"] // max(r["count"], 1))] += r["count"]
    return c


@pytest.fixture(scope="module")
def preset_8b():
    return simulate_rank(make_task(spec("llama3-8b", seq_len=SEQ), seq_len=SEQ))


def test_plain_pytorch_llama_costs_exactly_what_the_preset_costs(preset_8b):
    """The same Llama 3 8B written with nn.RMSNorm and F.scaled_dot_product_attention (what
    any third-party model calls; on fake cpu tensors those pick the CPU kernels) against
    simdist's llama3 (which calls the CUDA kernels): every memory category, the FLOPs and the
    op rows are equal, byte for byte."""
    plain = entrypoint_spec("plain_llama:plain_llama", dict(LLAMA3_8B, max_seq_len=SEQ))
    tr = simulate_rank(make_task(plain, seq_len=SEQ))
    for key in MEMORY:
        assert getattr(tr, key) == getattr(preset_8b, key), key
    assert tr.flops == preset_8b.flops
    assert _op_rows(tr) == _op_rows(preset_8b)
    ops = {r["op"] for r in tr.ops.to_pylist()}
    assert {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
            "simdist.fused_rms_norm", "_fused_rms_norm_backward"} <= ops
    assert not [op for op in ops if "for_cpu" in op or op == "rsqrt"]  # no decomposed RMSNorm


def _hf_against_preset(preset, n_layers: int) -> None:
    pytest.importorskip("transformers")
    from simdist.families import hf_spec

    hf = hf_spec(dict(HF_LLAMA3_8B, num_hidden_layers=n_layers))
    ours = spec("llama3-8b", seq_len=SEQ, n_layers=n_layers)
    assert count_params(build_model(hf)) == count_params(build_model(ours))
    if preset is None:
        preset = simulate_rank(make_task(ours, seq_len=SEQ))
    tr = simulate_rank(make_task(hf, seq_len=SEQ))
    assert tr.flops == preset.flops
    assert tr.peak_bytes == preset.peak_bytes + 2 * 64 * 4
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert getattr(tr, key) == getattr(preset, key), key


def test_hf_llama3_8b_shapes_against_the_preset():
    """As below, on 4 of the 32 layers (the full model: `-m slow`)."""
    _hf_against_preset(None, 4)


@pytest.mark.slow  # ~30 s: HF's op-by-op RMSNorm and rotary on 32 layers
def test_hf_llama3_8b_against_the_preset(preset_8b):
    """transformers' LlamaForCausalLM from the Llama 3 8B config: the same parameter count
    (8,030,261,248), the same FLOPs exactly (HF's RMSNorm runs op by op in fp32 — no FLOPs —,
    its GQA attention calls the flash kernel with 8 KV heads, whose FLOPs are those of the
    repeated heads). Peak bytes: 512 more, HF's rotary buffers `inv_freq` and
    `original_inv_freq` (fp32, head_dim / 2 = 64 each), resident; simdist's llama keeps none.
    (The activations differ — HF saves fp32 RMSNorm intermediates and no repeated K/V — but
    the peak is at the optimizer step, where they are gone.)"""
    assert count_params(build_model(spec("llama3-8b"))) == 8_030_261_248
    _hf_against_preset(preset_8b, 32)


SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, head_dim=32)
HF_CASES = {
    "llama": SMALL, "mistral": SMALL, "qwen2": SMALL, "qwen3": SMALL,
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
    "gemma": dict(SMALL, num_key_value_heads=1),
}


@pytest.mark.parametrize("model_type", list(HF_CASES))
def test_hf_models_from_config(model_type):
    """Built on meta from the config alone, parameter counts as transformers counts them,
    FSDP per decoder block and full checkpointing run, attention on the CUDA flash kernel."""
    pytest.importorskip("transformers")
    from simdist.families import hf_spec

    sp = hf_spec(dict(model_type=model_type, **HF_CASES[model_type]))
    model = build_model(sp)
    assert count_params(model) == model.hf.num_parameters()
    assert sp.args.blocks == ("transformer.h" if model_type == "gpt2" else "model.layers")
    tr = simulate_rank(make_task(sp, seq_len=128, dp_shard=2, activation_checkpointing="full"))
    ops = {r["op"] for r in tr.ops.to_pylist()}
    assert "_scaled_dot_product_flash_attention" in ops, ops
    # one FSDP unit per block (+ the root): forward all-gathers, backward reduce-scatters
    gathers = [r for r in tr.collectives.to_pylist()
               if r["phase"] == "fwd" and r["kind"] == "all_gather"]
    assert sum(r["count"] for r in gathers) == 3, gathers
    if model_type == "gpt2":  # dropout and LayerNorm as CUDA runs them
        assert {"native_dropout", "native_layer_norm"} <= ops


def test_hf_backward_ops_are_attributed_to_their_block():
    """HF attention modules take their tensors as keyword arguments (`self_attn(
    hidden_states=...)`), which torch's ModTracker does not see: it left the first block's
    attention open through backward and attributed every block's attention backward to it.
    Expected: one flash attention backward per block, each in its own block's self_attn."""
    pytest.importorskip("transformers")
    from simdist.families import hf_spec

    sp = hf_spec(dict(model_type="llama", **dict(SMALL, num_hidden_layers=3)))
    tr = simulate_rank(make_task(sp, seq_len=128))
    rows = [(r["phase"], r["module"], r["count"]) for r in tr.ops.to_pylist()
            if r["op"] == "_scaled_dot_product_flash_attention_backward"]
    assert sorted(rows) == [("bwd", f"hf.model.layers.{i}.self_attn", 1) for i in range(3)]


def test_hf_model_without_sdpa_names_training_attention():
    """Gemma 2 (logit soft-capping) has no SDPA attention in transformers: exit 2 naming
    training.attention, not transformers' ValueError; with attention: eager it builds."""
    pytest.importorskip("transformers")
    from simdist.families import ModelError, hf_spec

    with pytest.raises(ModelError) as info:
        hf_spec(dict(model_type="gemma2", **SMALL))
    assert info.value.key == "training.attention" and "eager" in str(info.value)
    sp = hf_spec(dict(model_type="gemma2", **SMALL), attention="eager")
    assert count_params(build_model(sp)) == build_model(sp).hf.num_parameters()


def test_hf_config_json_and_tensor_parallel_plan(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="llama", architectures=["LlamaForCausalLM"],
                                    torch_dtype="bfloat16", **SMALL)))
    cfg = load_config({"model": {"hf": {"config": str(path)}}, "training": {"seq_len": 128},
                       "cluster": {"gpus_per_node": 4}, "parallel": {"tp": 2}})
    run = plan_run(cfg, use_cache=False)
    assert run.spec.family == "hf" and run.spec.args.n_layers == 2
    tr = simulate_rank(run.tasks[0])
    tp = [r for r in tr.collectives.to_pylist() if r["mesh_dim"] == "tp"]
    assert tp, "the model's own _tp_plan issues TP collectives"
    # keys next to `config:` override the file's
    cfg = load_config({"model": {"hf": {"config": str(path), "num_hidden_layers": 3}}})
    assert plan_run(cfg, use_cache=False).spec.args.n_layers == 3



def _hf_tp_pair(model_type: str, a: dict, s: int, t: int):  # noqa: ANN202
    """An HF model's rank 0 without TP and with TP `t` (its own _tp_plan), and the TP run's
    collectives as (phase, kind, bytes) -> count (every one on the tp group of size t)."""
    def trace(tp: int):  # noqa: ANN202
        cfg = load_config({"model": {"hf": dict(model_type=model_type, **a)},
                           "training": {"seq_len": s}, "cluster": {"gpus_per_node": tp},
                           "parallel": {"tp": tp}})
        run = plan_run(cfg, use_cache=False)
        return run.spec, simulate_rank(run.tasks[0])

    spec1, tp1 = trace(1)
    _, tp2 = trace(t)
    c = collections.Counter()
    for r in tp2.collectives.to_pylist():
        assert r["mesh_dim"] == "tp" and r["group_size"] == t
        c[(r["phase"], r["kind"], r["bytes"])] += r["count"]
    return spec1, tp1, tp2, c


def test_hf_qwen3_tensor_parallel_from_its_own_plan_is_exact():
    """Qwen3's own `_tp_plan` (transformers): colwise q/k/v and gate/up, rowwise o and down,
    per-head q_norm / k_norm `replicated_with_grad_allreduce`, the vocab-sharded embedding
    (embedding_rowwise) and head (colwise_gather_output, kept sharded for loss_parallel)."""
    pytest.importorskip("transformers")
    a, L, s, t = HF_CASES["qwen3"], 2, 128, 2
    h, hd = a["hidden_size"], a["head_dim"]

    spec1, tp1, tp2, c = _hf_tp_pair("qwen3", a, s, t)
    act = 1 * s * h * 2  # one bf16 [b, s, h] activation, micro-batch 1
    assert dict(c) == {
        # forward: the partial outputs of o_proj and down_proj, and the vocab-sharded
        # embedding's output; loss_parallel's max, sum-exp and target logit (fp32 per token)
        ("fwd", "all_reduce", act): 2 * L + 1, ("fwd", "all_reduce", s * 4): 3,
        # backward: the input gradient of each colwise projection (q, k, v, gate, up: no
        # PrepareModuleInput in transformers' plan, so one each) and of the head
        ("bwd", "all_reduce", act): 5 * L + 1,
        # q_norm and k_norm weights (bf16 [head_dim]): each rank's gradient covers its heads
        ("bwd", "all_reduce", hd * 2): 2 * L}
    # parameters (fp32) split by t, except every norm weight: input and post-attention
    # layernorms, q_norm, k_norm, the final norm
    n = count_params(build_model(spec1, "meta"))
    replicated = (2 * L + 1) * h + 2 * L * hd
    assert tp1.param_bytes == 4 * n
    assert tp2.param_bytes == 4 * ((n - replicated) // t + replicated)
    assert tp2.flops * t == tp1.flops  # matmuls and attention split by heads / columns


def test_hf_mixtral_tensor_parallel_experts_from_its_own_plan_are_exact():
    """Mixtral's `_tp_plan`: attention colwise/rowwise as Qwen3's, and `moe_tp_experts` (every
    rank a slice of every expert: the packed gate_up_proj [E, 2I, h] on its 2I rows, down_proj
    [E, h, I] on I, as the plan's packed_colwise / rowwise parameter entries say), the router
    replicated."""
    pytest.importorskip("transformers")
    a, L, s, t = HF_CASES["mixtral"], 2, 128, 2
    h, E, k = a["hidden_size"], a["num_local_experts"], a["num_experts_per_tok"]

    spec1, tp1, tp2, c = _hf_tp_pair("mixtral", a, s, t)
    act = 1 * s * h * 2  # one bf16 [b, s, h] activation, micro-batch 1
    assert dict(c) == {
        # forward: o_proj's and the experts' partial outputs, the vocab-sharded embedding's
        # output; loss_parallel's max, sum-exp and target logit (fp32 per token)
        ("fwd", "all_reduce", act): 2 * L + 1, ("fwd", "all_reduce", s * 4): 3,
        # backward: the input gradients of q, k, v (one each), of the experts (the hidden
        # states every rank's expert slices read) and of the head
        ("bwd", "all_reduce", act): 4 * L + 1,
        # and of the routing weights the experts scale by ([s, k], fp32: the router's softmax
        # runs in fp32)
        ("bwd", "all_reduce", s * k * 4): L}
    # parameters (fp32) split by t, except the norms and the router [E, h]
    n = count_params(build_model(spec1, "meta"))
    replicated = (2 * L + 1) * h + L * E * h
    assert tp1.param_bytes == 4 * n
    assert tp2.param_bytes == 4 * ((n - replicated) // t + replicated)
    # FLOPs split by t, except the replicated router's matmul (forward, input and weight
    # gradients: 3 x 2 s h E per layer), which every rank runs whole
    router = L * 3 * 2 * s * h * E
    assert tp2.flops == (tp1.flops - router) // t + router


@pytest.mark.parametrize("model_type, words", [
    ("phi3", ["parallel.tp", "rowwise_split_input"]),
    ("gpt2", ["parallel.tp", "no tensor-parallel plan"]),
])
def test_hf_tp_styles_without_a_dtensor_style_are_config_errors(model_type, words):
    pytest.importorskip("transformers")
    fields = HF_CASES.get(model_type) or dict(SMALL, pad_token_id=0)  # phi3: pad id in vocab
    cfg = load_config({"model": {"hf": dict(model_type=model_type, **fields)},
                       "training": {"seq_len": 128}, "cluster": {"gpus_per_node": 2},
                       "parallel": {"tp": 2}})
    with pytest.raises(ConfigError) as info:
        plan_run(cfg, use_cache=False)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_hf_without_transformers_is_exit_2(monkeypatch, capsys, tmp_path):
    import simdist.coordinator
    from simdist.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.setattr(simdist.coordinator, "simulate", lambda *a, **k: 1 / 0)
    config = tmp_path / "hf.yaml"
    config.write_text("model: {hf: {model_type: llama}}\n")
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.hf" in err and "pip install -e '.[hf]'" in err and err.count("\n") == 1, err


def test_entrypoint_blocks_path():
    """A model with its blocks at `model.layers` (torchtitan/HF layout): `blocks:` names them;
    without it the plan check lists the containers the model has."""
    base = {"model": {"entrypoint": "plain_llama:titan_llama", "kwargs": {"max_seq_len": 128}},
            "training": {"seq_len": 128}, "cluster": {"gpus_per_node": 2}}
    with pytest.raises(ConfigError) as info:
        plan_run(load_config(base, trust_code=True), use_cache=False)
    assert info.value.key == "model.blocks" and "model.layers" in info.value.message
    base["model"]["blocks"] = "model.layers"
    run = plan_run(load_config(base, trust_code=True), use_cache=False)
    tr = simulate_rank(run.tasks[0])
    gathers = [r for r in tr.collectives.to_pylist()
               if r["phase"] == "fwd" and r["kind"] == "all_gather"]
    assert sum(r["count"] for r in gathers) == 3  # 2 blocks + the root unit
    with pytest.raises(ConfigError) as info:
        load_config({"model": {"preset": "llama3-debug", "blocks": "layers"}})
    assert info.value.key == "model.blocks"


@pytest.mark.parametrize("fault, op", [("item", "aten._local_scalar_dense"),
                                       ("nonzero", "aten.nonzero"),
                                       ("custom_op", "simdist_tests.opaque")])
def test_ops_fake_execution_cannot_run_name_op_and_module(fault, op):
    sp = entrypoint_spec("fault_models:tiny", dict(fault=fault))
    with pytest.raises(CannotSimulate) as info:
        simulate_rank(make_task(sp, seq_len=64))
    e = info.value
    assert e.op.startswith(op) and e.module == "layers.0", (e.op, e.module)
    text = str(e)
    assert "\n" not in text and "cannot run on fake tensors" in text
    assert ("register_fake" in text) and (op in text)


def test_cannot_simulate_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    import simdist.coordinator
    from simdist.cli import main

    def fail(*args, **kwargs):
        raise CannotSimulate("aten.nonzero.default", "layers.0.moe", "its output shape depends "
                             "on tensor values", "make it static")

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    monkeypatch.setattr(simdist.coordinator, "simulate", fail)
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: llama3-debug}\n")
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("simdist: cannot simulate the model: op aten.nonzero.default in "
                          "module layers.0.moe"), err
