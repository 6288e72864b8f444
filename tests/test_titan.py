"""FlexAttention with CUDA semantics (simdist/mode/flex_attention.py) and torchtitan's own Llama 3
through `model.entrypoint` (simdist/models/titan.py; torchtitan is the `titan` test extra)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_task, spec
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.flop_counter import FlopCounterMode

from simdist.config import ConfigError, load_config
from simdist.costmodel.kernels import OpClass, op_class
from simdist.families import build_model, count_params
from simdist.memo import simulate_rank
from simdist.mode.cuda import cuda_semantics
from simdist.planner import plan_run

B, H, S, D = 2, 4, 512, 64
BLOCK = 128  # torch's _DEFAULT_SPARSE_BLOCK_SIZE, what torchtitan's FlexAttention.Config uses


def _causal(b, h, q, kv):  # noqa: ANN001, ANN202
    return q >= kv


def _flex_step(block_mask, saved: list | None = None) -> tuple[dict, list]:  # noqa: ANN001
    """flex_attention forward and backward on fake bf16 cpu tensors under cuda_semantics:
    (FLOPs by op, the (shape, dtype) of the output and the three gradients); `saved` gets the
    (shape, dtype) of each tensor the forward keeps for backward."""
    outputs = []
    saved = [] if saved is None else saved

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with FakeTensorMode(allow_non_fake_inputs=True), cuda_semantics():
        q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = flex_attention(q, k, v, block_mask=block_mask)
            outputs.append((tuple(out.shape), out.dtype))
            out.sum().backward()
            outputs += [(tuple(t.grad.shape), t.grad.dtype) for t in (q, k, v)]
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return flops, outputs


def test_flex_attention_runs_with_backward_and_counts_the_listed_blocks():
    """A CPU build refuses flex_attention's backward; under cuda_semantics fake tensors run it
    as the CUDA kernels do: output and gradients in the inputs' dtype, the forward keeping what
    the backward kernel reads. FLOPs against the formulas, with d = head dim:
    - no mask (dense): forward 4*B*H*S^2*d (Q K^T and P V, 2 FLOPs per multiply-add), backward
      10*B*H*S^2*d (five S x S x d matmuls: Q K^T again, dO V^T, P^T dO, dS K, dS^T Q), torch's
      SDPA formulas (utils/flop_counter.py);
    - causal mask built from real tensors: n = S/128 query blocks, block i lists i+1 key blocks,
      n(n+1)/2 blocks of 128 x 128 entries in all, each computed in full (partial blocks are
      masked inside the kernel), so the dense figures times n(n+1)/2 / n^2."""
    saved: list = []
    dense, outputs = _flex_step(None, saved)
    assert dense["simdist.flex_attention"] == 4 * B * H * S * S * D
    assert dense["simdist.flex_attention_backward"] == 10 * B * H * S * S * D
    assert outputs == [((B, H, S, D), torch.bfloat16)] + [((B, H, S, D), torch.bfloat16)] * 3
    # kept for backward, as the compiled CUDA kernels keep them: q, k, v, out and the fp32
    # logsumexp (not the fp32 max_scores, which the backward kernel does not read)
    assert sorted(saved, key=str) == sorted([((B, H, S, D), torch.bfloat16)] * 4
                                            + [((B, H, S), torch.float32)], key=str)
    mask = create_block_mask(_causal, None, None, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    causal, _ = _flex_step(mask)
    n = S // BLOCK
    blocks = n * (n + 1) // 2
    assert causal["simdist.flex_attention"] == 4 * B * H * blocks * BLOCK * BLOCK * D
    assert causal["simdist.flex_attention_backward"] == 10 * B * H * blocks * BLOCK * BLOCK * D
    assert op_class("simdist.flex_attention") is OpClass.ATTENTION_FWD
    assert op_class("simdist.flex_attention_backward") is OpClass.ATTENTION_BWD


def test_flex_attention_mask_on_fake_tensors_counts_dense_and_says_so():
    """A BlockMask built inside fake mode has no values: the dense area is counted (an upper
    bound) and a warning says so."""
    with FakeTensorMode():
        mask = create_block_mask(_causal, None, None, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flops, _ = _flex_step(mask)
    assert flops["simdist.flex_attention"] == 4 * B * H * S * S * D
    assert any("sparsity is unknown" in str(w.message) for w in caught)


def _titan(flavor: str, n_layers: int, seq: int, **parallel) -> tuple:  # noqa: ANN003
    cfg = {"model": {"entrypoint": "simdist.models.titan:build",
                     "kwargs": {"flavor": flavor, "n_layers": n_layers},
                     "inputs": "simdist.models.titan:trainer_inputs"},
           "training": {"seq_len": seq, "micro_batch": 1, "dtype": "bf16"},
           "parallel": parallel, "cluster": {"gpus_per_node": 2}}
    run = plan_run(load_config(cfg, trust_code=True), use_cache=False)
    return run.spec, simulate_rank(run.tasks[0])


def test_torchtitan_llama3_runs_unmodified_under_fsdp():
    """torchtitan's Llama3Model, built from its own registry config (debug flavour, 2 layers),
    with torchtitan's flex attention and the masks its trainer builds, under FSDP2 over 2 GPUs:
    parameters equal torchtitan's own count; one FSDP all-gather per block and the root in
    forward; the flex kernels' FLOPs are the causal formula of the previous test at
    S=256 (n=2: 3 of 4 blocks); every flex op is attributed to its block's attention."""
    pytest.importorskip("torchtitan")
    from torchtitan.models.llama3 import Llama3Model, model_registry

    seq = 256
    sp, tr = _titan("debugmodel", 2, seq, dp_shard=2)
    model = build_model(sp)
    assert type(model) is Llama3Model
    config = model_registry("debugmodel").model
    config.layers = config.layers[:2]
    assert count_params(model) == config.get_nparams_and_flops(model, seq)[0]
    gathers = [r for r in tr.collectives.to_pylist()
               if r["phase"] == "fwd" and r["kind"] == "all_gather"]
    assert sum(r["count"] for r in gathers) == 3
    attn = model.layers["0"].attention
    heads, d = attn.n_heads, attn.head_dim
    blocks = 3  # causal over 2 x 2 blocks of 128
    flex = [r for r in tr.ops.to_pylist() if r["op"].startswith("simdist.flex_attention")]
    assert {r["module"] for r in flex} == {f"layers.{i}.attention.inner_attention" for i in (0, 1)}
    per_layer = {r["op"]: r["flops"] // r["count"] for r in flex}
    assert per_layer == {"simdist.flex_attention": 4 * heads * blocks * 128 * 128 * d,
                         "simdist.flex_attention_backward": 10 * heads * blocks * 128 * 128 * d}


def test_model_inputs_only_with_an_entrypoint():
    with pytest.raises(ConfigError) as info:
        load_config({"model": {"preset": "llama3-debug", "inputs": "m:f"}})
    assert info.value.key == "model.inputs"


def test_entrypoint_without_core_attention_refuses_selective_checkpointing():
    """Selective checkpointing recomputes a `core_attention` method: a model without one is a
    config error before simulating, not a ValueError from inside a rank."""
    cfg = {"model": {"entrypoint": "plain_llama:plain_llama", "kwargs": {"max_seq_len": 128}},
           "training": {"seq_len": 128, "activation_checkpointing": "selective"}}
    with pytest.raises(ConfigError) as info:
        plan_run(load_config(cfg, trust_code=True), use_cache=False)
    assert info.value.key == "training.activation_checkpointing"


def test_torchtitan_llama3_8b_against_the_preset():
    """torchtitan's Llama 3 8B (2 of its 32 layers, seq 256, FSDP over 2) against simdist's
    llama3-8b preset of the same shape. Equal: parameters, gradients, every non-attention
    FLOP. Where they legitimately differ, each difference computed independently:
    - attention FLOPs: torch's formula for the preset's flash kernel counts the dense S x S
      square even when causal; flex counts the blocks the causal mask lists, 3 of 4 here;
    - optimizer: torchtitan fuses wq, wk, wv into one wqkv, two parameter tensors fewer per
      layer, each one fp32 AdamW `step` scalar (4 bytes) fewer;
    - the rest at the peak: torchtitan's RoPE keeps a complex64 table of max_seq_len (131072)
      x head_dim/2 per layer, and the trainer's `positions` (B x S int64) live all step;
    and the peak differs by exactly their sum."""
    pytest.importorskip("torchtitan")
    seq = 256
    sp, tr = _titan("8B", 2, seq, dp_shard=2)
    pre = simulate_rank(make_task(spec("llama3-8b", seq_len=seq, n_layers=2), seq_len=seq,
                                  micro_batch=1, dp_shard=2))
    titan, ours = build_model(sp), build_model(spec("llama3-8b", seq_len=seq, n_layers=2))
    assert count_params(titan) == count_params(ours)
    assert tr.param_bytes == pre.param_bytes and tr.grad_bytes == pre.grad_bytes

    def flops(trace, attention: bool) -> int:  # noqa: ANN001
        return sum(r["flops"] for r in trace.ops.to_pylist()
                   if (op_class(r["op"]) in (OpClass.ATTENTION_FWD, OpClass.ATTENTION_BWD))
                   == attention)

    assert flops(tr, False) == flops(pre, False)
    assert flops(tr, True) * 4 == flops(pre, True) * 3
    fewer_tensors = len(list(ours.parameters())) - len(list(titan.parameters()))
    assert fewer_tensors == 2 * 2
    assert pre.optimizer_bytes - tr.optimizer_bytes == 4 * fewer_tensors
    rope = sum(b.numel() * b.element_size() for b in titan.buffers())
    assert rope == 2 * 131072 * 64 * 8 and not list(ours.buffers())
    positions = 1 * seq * 8
    assert tr.other_bytes - pre.other_bytes == rope + positions
    assert tr.peak_bytes - pre.peak_bytes == rope + positions - 4 * fewer_tensors


@pytest.mark.slow
def test_torchtitan_llama3_through_simdist_run(tmp_path, capsys):
    """`simdist run --trust-code` with torchtitan's Llama 3 (debug flavour, its 6 layers, FSDP
    over one 8-GPU node) on Ray actors: exit 0, a plan that fits, flex kernels in every
    layer's attention, forward and backward."""
    pytest.importorskip("torchtitan")
    import json

    import pyarrow.parquet as pq

    from simdist.cli import main

    cfg = tmp_path / "titan.yaml"
    cfg.write_text("model:\n  entrypoint: simdist.models.titan:build\n"
                   "  kwargs: {flavor: debugmodel}\n"
                   "  inputs: simdist.models.titan:trainer_inputs\n"
                   "training: {seq_len: 512, micro_batch: 1, dtype: bf16}\n"
                   "parallel: {dp_shard: -1}\n"
                   "cluster: {gpu: h100-sxm, gpus_per_node: 8, nodes: 1}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--trust-code", "--out", str(out), "--quiet"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((out / "plan.json").read_text())["fits"] is True
    rows = pq.read_table(out / "ops.parquet").to_pylist()
    flex = {(r["op"], r["module"]) for r in rows if r["op"].startswith("simdist.flex_attention")}
    assert flex == {(op, f"layers.{i}.attention.inner_attention") for i in range(6)
                    for op in ("simdist.flex_attention", "simdist.flex_attention_backward")}
