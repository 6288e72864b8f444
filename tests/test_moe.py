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


# --- routing, computed independently -----------------------------------------------------

def zipf_by_hand(alpha: float, n_tokens: int, n_experts: int, top_k: int) -> list[int]:
    """The zipf routing as models/routing.py documents it, written out here: expert i's share
    of the n*k copies is proportional to 1/(i+1)^alpha; an expert whose share exceeds n (top-k
    picks distinct experts) is capped at n and the rest re-shared over the others in
    proportion; integers by largest remainder (ties to the lower index)."""
    total = n_tokens * top_k
    weight = {i: (i + 1) ** -alpha for i in range(n_experts)}
    capped: dict[int, int] = {}
    while True:
        rest = total - n_tokens * len(capped)
        free = [i for i in weight if i not in capped]
        share = {i: rest * weight[i] / sum(weight[j] for j in free) for i in free}
        over = [i for i in free if share[i] > n_tokens]
        if not over:
            break
        capped.update({i: n_tokens for i in over})
    counts = {**capped, **{i: int(share[i]) for i in free}}
    for i in sorted(free, key=lambda i: (int(share[i]) - share[i], i))[:total - sum(counts.values())]:
        counts[i] += 1
    return [counts[i] for i in range(n_experts)]


@pytest.mark.parametrize("n,e,k,alpha", [(256, 8, 2, 1.2), (4096, 64, 6, 1.2), (100, 8, 2, 3.0),
                                         (1000, 16, 4, 0.5)])
def test_zipf_routing_equals_an_independent_computation(n, e, k, alpha):
    assert expert_token_counts(f"zipf:{alpha}", n, e, k, 0) == zipf_by_hand(alpha, n, e, k)


# --- expert parallelism through the real rank path ---------------------------------------

def test_ep_rank_path_token_counts_shards_reductions_and_hot_cold_ranks():
    # moe-debug, 2 layers (layer 0 dense, layer 1 MoE: 8 experts, top-2, moe_ffn 256, one
    # shared expert), dp_shard 8 = dp_shard_mod_ep 2 x ep 4 (ep innermost: rank r is EP rank
    # r % 4), zipf:1.2, micro-batch 1 x seq 256.
    s, k, dim, ffn, E, ep, shard = 256, 2, 256, 256, 8, 4, 8
    model = spec("moe-debug", seq_len=s, n_layers=2, routing="zipf:1.2")
    a = model.args
    counts = zipf_by_hand(1.2, s, E, k)  # every rank routes its s tokens alike
    # by hand: 1/(i+1)^1.2 = 1, .4353, .2676, .1895, .1450, .1165, .0968, .0825 (sum 2.3331);
    # x 512 / 2.3331 = 219.45, 95.53, 58.72, 41.58, 31.81, 25.57, 21.25, 18.10 (none over the
    # cap 256); floors sum to 508, the 4 largest remainders (.81 .72 .58 .57) get one more
    assert counts == [219, 95, 59, 42, 32, 26, 21, 18] and sum(counts) == s * k
    # EP rank 0 holds experts 0-1, rank 3 experts 6-7; each receives from all 4 ranks
    recv = {0: ep * (counts[0] + counts[1]), 3: ep * (counts[6] + counts[7])}
    assert recv == {0: 1256, 3: 156}
    hot, cold = run_rank(model, rank=0, dp_shard=shard, ep=ep), run_rank(model, rank=3,
                                                                        dp_shard=shard, ep=ep)
    expert_params = (E // ep) * 3 * dim * ffn  # this EP rank's experts (w1, w2, w3)
    non_expert = (2 * a.vocab_size * dim + dim                            # embedding, head, norm
                  + 2 * (2 * dim * dim + 2 * dim * a.n_kv_heads * a.head_dim + 2 * dim)  # attn+norms
                  + 3 * dim * a.ffn_dim                                   # dense feed-forward
                  + dim * E + 3 * dim * a.n_shared_experts * ffn)         # router, shared expert
    for tr, r in ((hot, 0), (cold, 3)):
        # non-expert parameters FSDP-sharded over dp_shard (8), experts over dp_shard_mod_ep (2)
        assert tr.param_bytes == 4 * (non_expert // shard + expert_params // (shard // ep))
        # the experts' FSDP unit over dp_shard_mod_ep: bf16 all-gather (forward, and again in
        # backward) and fp32 reduce-scatter of the unsharded local experts
        mod = {(x["phase"], x["kind"], x["bytes"]): x["count"] for x in tr.collectives.to_pylist()
               if x["mesh_dim"] == "dp_shard_mod_ep"}
        assert mod == {("fwd", "all_gather", 2 * expert_params): 1,
                       ("bwd", "all_gather", 2 * expert_params): 1,
                       ("bwd", "reduce_scatter", 4 * expert_params): 1}
        # all-to-alls: the counts exchange (E int64), dispatch and combine forward and their
        # gradients backward; bytes = the larger of the sent (s k rows) and received buffers
        a2a = sorted((x["phase"], x["bytes"], x["count"]) for x in tr.collectives.to_pylist()
                     if x["mesh_dim"] == "ep")
        rows = max(s * k, recv[r])
        assert a2a == sorted([("fwd", 8 * E, 1), ("fwd", rows * dim * 2, 2),
                              ("bwd", rows * dim * 2, 2)])
        fwd_expert = sum(x["flops"] for x in tr.ops.to_pylist()
                         if x["phase"] == "fwd" and x["module"].endswith(".moe.experts"))
        assert fwd_expert == 3 * 2 * recv[r] * dim * ffn
    # Activations differ only by the received rows' saved tensors: the grouped GEMMs' input
    # (2 dim bytes per row, shared by w1 and w3), w1 out, silu out, w3 out, their product
    # (4 x 2 ffn), and the int64 permutation that groups rows by local expert (8).
    assert hot.activation_bytes - cold.activation_bytes == (recv[0] - recv[3]) * (2 * dim + 8 * ffn + 8)
