"""MoE family, static routing and expert parallelism: exact parameter counts against a hand
formula, routing counts, a single-rank training step, and EP all-to-all dispatch/combine under
the fake process group (bytes for balanced routing; hot ranks for zipf routing)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_rank, spec
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.flop_counter import FlopCounterMode

from simdist.families import build_model, count_params
from simdist.models.moe import GroupedExperts, moe_layers
from simdist.models.routing import RoutingError, ep_received_tokens, expert_token_counts
from simdist.mode.context import StepContext
from simdist.mode.session import rank_session
from simdist.mode.step import init_optimizer_state, make_optimizer, run_step
from simdist.parallel.expert_parallel import apply_ep, ep_received_counts


def moe_params_by_hand(dim, n_layers, n_heads, n_kv_heads, vocab, ffn, moe_ffn, n_experts,
                       n_shared, n_dense):
    """Untied embedding and head, RMSNorm weights only, no biases."""
    head_dim = dim // n_heads
    attention = 2 * dim * n_heads * head_dim + 2 * dim * n_kv_heads * head_dim  # wq, wo, wk, wv
    norms = 2 * dim
    dense_ffn = 3 * dim * ffn
    moe = (n_experts * 3 * dim * moe_ffn  # routed SwiGLU experts
           + 3 * dim * n_shared * moe_ffn  # shared experts, one SwiGLU of n_shared * moe_ffn
           + dim * n_experts)  # router gate
    n_moe = n_layers - n_dense
    layers = n_dense * (attention + norms + dense_ffn) + n_moe * (attention + norms + moe)
    return 2 * vocab * dim + dim + layers


def test_mixtral_8x7b_parameter_count_is_exact():
    n = count_params(build_model(spec("mixtral-8x7b")))
    assert n == moe_params_by_hand(4096, 32, 32, 8, 32000, 14336, 14336, 8, 0, 0)
    # Published "46.7B": Mistral's own count is 46,702,792,704 (the same number, HF Mixtral).
    assert n == 46_702_792_704


def test_deepseek_moe_16b_parameter_count_is_exact():
    n = count_params(build_model(spec("deepseek-moe-16b")))
    assert n == moe_params_by_hand(2048, 28, 16, 16, 102400, 10944, 1408, 64, 2, 1)
    # Published "16.4B" (DeepSeek-MoE paper; 16,375,728,128 for the HF checkpoint).
    assert n == 16_375_728_128


# --- routing --------------------------------------------------------------------------------

def test_balanced_routing_splits_evenly_with_remainder_first():
    assert expert_token_counts("balanced", 10, 4, 2, 0) == [5, 5, 5, 5]
    assert expert_token_counts("balanced", 11, 4, 2, 0) == [6, 6, 5, 5]


def test_zipf_routing_sums_exactly_caps_at_n_tokens_and_decreases():
    for n, e, k, a in [(256, 8, 2, 1.2), (4096, 64, 6, 1.2), (100, 8, 2, 3.0), (7, 8, 8, 2.0)]:
        c = expert_token_counts(f"zipf:{a}", n, e, k, 0)
        assert sum(c) == n * k and max(c) <= n and c == sorted(c, reverse=True)
    # alpha 3 over 8 experts: expert 0's share (83%) exceeds one copy per token: capped at n,
    # the rest re-shared in proportion.
    c = expert_token_counts("zipf:3", 100, 8, 2, 0)
    assert c[0] == 100 and c[1] > c[2]
    assert expert_token_counts("zipf:2", 7, 8, 8, 0) == [7] * 8  # k = E: every expert every token


def test_file_routing_rescales_loads_per_layer(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps([0.5, 0.25, 0.125, 0.125]))
    assert expert_token_counts(f"file:{one}", 100, 4, 1, 3) == [50, 25, 13, 12]
    per_layer = tmp_path / "layers.json"
    per_layer.write_text(json.dumps([[1, 1, 1, 1], [300, 100, 0, 0]]))
    assert expert_token_counts(f"file:{per_layer}", 8, 4, 1, 0) == [2, 2, 2, 2]
    assert expert_token_counts(f"file:{per_layer}", 8, 4, 1, 1) == [6, 2, 0, 0]
    with pytest.raises(RoutingError, match="layer 2"):
        expert_token_counts(f"file:{per_layer}", 8, 4, 1, 2)
    with pytest.raises(RoutingError, match="experts"):
        expert_token_counts(f"file:{one}", 8, 8, 1, 0)
    with pytest.raises(RoutingError):
        expert_token_counts("zipf:-1", 8, 4, 1, 0)


def test_grouped_mm_and_expert_loop_count_the_same_flops():
    # bf16 takes torch._grouped_mm (FLOP formula registered by simdist.models.moe); fp32 the
    # per-expert matmuls. Uneven counts, an empty expert included.
    counts = [40, 0, 24, 64]
    flops = {}
    for dtype in (torch.bfloat16, torch.float32):
        experts = GroupedExperts(64, 32, 4).to(device="meta", dtype=dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            experts.to_empty(device="cpu")
            x = torch.randn(128, 64, dtype=dtype, requires_grad=True)
            with FlopCounterMode(display=False) as fc:
                experts(x, counts).backward(torch.randn(128, 64, dtype=dtype))
        flops[dtype] = fc.get_total_flops()
    assert flops[torch.bfloat16] == flops[torch.float32] == 3 * 3 * 2 * 128 * 64 * 32


# --- one rank -------------------------------------------------------------------------------

def test_moe_debug_trains_one_rank_and_counts_expert_flops():
    s, k, dim, hidden = 256, 2, 256, 256
    model = spec("moe-debug", seq_len=s, n_layers=2)
    tr = run_rank(model, seq_len=s)
    assert tr.peak_bytes > tr.param_bytes > 0 and tr.grad_bytes > 0 and tr.optimizer_bytes > 0
    ops = tr.ops.to_pylist()
    fwd_expert = sum(r["flops"] for r in ops if r["phase"] == "fwd"
                     and r["module"].endswith(".moe.experts"))
    n_moe = model.args.n_layers - model.args.n_dense_layers
    # three matmuls of the s*k token copies per MoE layer (bf16: one grouped GEMM each)
    assert fwd_expert == n_moe * 3 * 2 * s * k * dim * hidden
    assert any(r["op"] == "_grouped_mm" for r in ops)
    assert any(r["op"] == "topk" and r["module"].endswith("moe.router") for r in ops)


# --- expert parallelism ---------------------------------------------------------------------

def ep_step(ep: int, rank: int, routing: str, seq_len: int = 256) -> dict:
    """Rank `rank` of a 1-D EP mesh: moe-debug (2 layers: one dense, one MoE) in bf16, experts
    sharded with apply_ep, materialised fake, one recorded step (as simdist.mode.rank does)."""
    ctx = StepContext()
    with rank_session(rank, ep, ctx):
        mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
        model = build_model(spec("moe-debug", seq_len=seq_len, n_layers=2), "meta")
        apply_ep(model, mesh, rank, routing)
        model.to(torch.bfloat16)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model.to_empty(device="cpu")
        fake_mode.allow_non_fake_inputs = False
        with fake_mode, ctx.exclude():
            optimizer = make_optimizer(model, "adamw")
            init_optimizer_state(model, optimizer)
        fields = run_step(model, optimizer, fake_mode, ctx,
                          group_dims={mesh.get_group().group_name: "ep"},
                          vocab_size=model.args.vocab_size, batch=1, seq_len=seq_len,
                          num_microbatches=1, all_microbatches=False)
    fields["model"] = model
    return fields


def _a2a(fields: dict) -> list[tuple]:
    """EP all-to-alls as (phase, bytes, count); forward ones run inside `moe.experts`."""
    rows = [r for r in fields["collectives"].to_pylist() if r["kind"] == "all_to_all"]
    assert all(r["mesh_dim"] == "ep" and r["group_size"] == 4 for r in rows)
    assert all(r["module"].endswith(".moe.experts") for r in rows if r["phase"] == "fwd")
    return sorted((r["phase"], r["bytes"], r["count"]) for r in rows)


def test_ep_balanced_all_to_all_bytes():
    ep, s, k, dim, n_experts = 4, 256, 2, 256, 8
    tr = ep_step(ep, 1, "balanced", s)
    (moe,) = moe_layers(tr["model"])
    assert tuple(moe.experts.w1.shape) == (n_experts // ep, 256, dim)  # experts 2 and 3
    # 512 token copies, 64 per expert: 128 sent to every rank, 4 x 128 received.
    rows = s * k
    a2a = rows * dim * 2  # bf16 rows, sent == received under balanced routing
    assert _a2a(tr) == sorted([
        ("fwd", n_experts * 8, 1),  # num_tokens_per_expert exchange (int64)
        ("fwd", a2a, 2),  # dispatch + combine
        ("bwd", a2a, 2),  # their gradients, reversed
    ])
    assert ep_received_tokens("balanced", s, n_experts, k, 1, ep, 1) == rows


def test_ep_zipf_hot_rank_has_more_tokens_flops_and_memory():
    ep, s, k, dim, hidden, n_experts = 4, 256, 2, 256, 256, 8
    counts = expert_token_counts("zipf:1.2", s, n_experts, k, 1)
    first, last = ep_step(ep, 0, "zipf:1.2", s), ep_step(ep, ep - 1, "zipf:1.2", s)
    recv = [ep * (counts[2 * r] + counts[2 * r + 1]) for r in (0, ep - 1)]
    assert recv[0] > 4 * recv[1]
    for tr, n in zip((first, last), recv):
        # what the rank receives is what its experts compute on...
        fwd_expert = sum(r["flops"] for r in tr["ops"].to_pylist()
                         if r["phase"] == "fwd" and r["module"].endswith(".moe.experts"))
        assert fwd_expert == 3 * 2 * n * dim * hidden
        # ...and the dispatch all-to-all's output (the larger buffer of the two) has its size
        sent = s * k * dim * 2
        assert ("fwd", max(sent, n * dim * 2), 2) in _a2a(tr)
    assert ep_received_counts(first["model"], "zipf:1.2", s, ep, 0) == (
        (ep * counts[0], ep * counts[1]),)
    assert ep_received_counts(spec("moe-debug", n_layers=2).args,
                              "zipf:1.2", s, ep, ep - 1) == ((ep * counts[6], ep * counts[7]),)
    assert first["flops"] > last["flops"]
    assert first["peak_bytes"] > last["peak_bytes"]
    assert first["activation_bytes"] > last["activation_bytes"]
