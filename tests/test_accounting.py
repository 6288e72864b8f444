"""Per-rank accounting from fake execution against independent expectations: exact parameter
counts, the ZeRO/FSDP model-state formula, activation bytes derived by hand from the model code,
the Megatron/torchtitan FLOP formulas, and collective bytes from the module structure."""

from __future__ import annotations

import pytest
from conftest import run_rank, spec

from simdist.families import build_model, count_params

N_8B = 8_030_261_248


def test_llama3_8b_parameter_count_is_exact():
    assert count_params(build_model(spec("llama3-8b"))) == N_8B


def test_gpt_parameter_count_matches_megatron_formula():
    # Narayanan et al. 2021: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)), tied embeddings.
    l, h, V, s = 36, 4096, 51200, 2048
    expected = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    # The formula leaves out the final LayerNorm (weight and bias: 2h).
    assert count_params(build_model(spec("gpt-7.5b", seq_len=s))) == round(expected) + 2 * h


def adamw_step_counter_bytes(model) -> int:  # noqa: ANN001
    """torch.optim.AdamW (torch 2.13, adam.py `_init_group`): with capturable and fused off,
    every parameter with state gets `state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())`:
    one fp32 scalar (4 bytes) per parameter *tensor*, whatever its size or sharding."""
    return 4 * sum(1 for _ in build_model(model, "meta").parameters())


def test_fsdp_model_states_are_exactly_16N_over_8_plus_step_counters(llama8b):
    tr = run_rank(llama8b, dp_shard=8)
    # FSDP2 (MixedPrecisionPolicy bf16 compute, fp32 reduce): fp32 sharded parameters 4N/8,
    # fp32 sharded gradients 4N/8, AdamW exp_avg + exp_avg_sq 8N/8 (N = 8,030,261,248 divides
    # by 8, so no padding), and 291 step counters (32 x 9 block tensors + embedding, norm, head).
    assert adamw_step_counter_bytes(llama8b) == 4 * 291
    assert tr.param_bytes == tr.grad_bytes == 4 * N_8B // 8
    assert tr.optimizer_bytes == 8 * N_8B // 8 + 4 * 291
    assert tr.param_bytes + tr.grad_bytes + tr.optimizer_bytes == 16 * N_8B // 8 + 4 * 291
    assert tr.peak_bytes >= tr.param_bytes + tr.grad_bytes + tr.optimizer_bytes


def test_ddp_model_states_are_exactly_16N_and_other_is_adamw_sqrt_temporary(llama8b):
    tr = run_rank(llama8b, dp_replicate=8)
    states = tr.param_bytes + tr.grad_bytes + tr.optimizer_bytes
    assert states == 16 * N_8B + adamw_step_counter_bytes(llama8b)
    # The peak is in the optimizer step: foreach AdamW (torch's _multi_tensor_adam) builds
    # `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`, one fp32 temporary of every
    # parameter (4N), while parameters, gradients and state are all live; nothing is saved for
    # backward at that point and llama3 has no buffers (RoPE tables are made per forward). So
    # other_bytes, "the rest at the peak", is exactly that temporary.
    # (Before the fix in mode/streams.py it was 4N - activation_bytes = 30,507,739,388: the
    # peak of saved activations, reached in an earlier forward, was subtracted from a peak
    # that holds none.)
    assert tr.peak_phase == "optim"
    assert tr.other_bytes == 4 * N_8B
    assert tr.peak_bytes == states + 4 * N_8B


def _per_layer_saved(preset: str, attention: str, ac: str = "none", **kw) -> int:
    one = run_rank(spec(preset, attention=attention, n_layers=1, **kw), micro_batch=2,
                   activation_checkpointing=ac)
    two = run_rank(spec(preset, attention=attention, n_layers=2, **kw), micro_batch=2,
                   activation_checkpointing=ac)
    return two.activation_bytes - one.activation_bytes


def test_llama3_saved_activations_per_layer_match_the_code():
    b, s, h, a, f = 2, 256, 256, 16, 768  # llama3-debug, micro_batch 2, seq 256, bf16
    # Saved for backward by one TransformerBlock (bytes):
    #   attention_norm: input x 2bsh + fp32 rstd 4bs      (fused RMSNorm saves input and rstd)
    #   wq/wk/wv: their shared input (the norm output)     2bsh
    #   RoPE multiplies by constant cos/sin (shared across layers): saves nothing per layer
    #   flash attention: q after RoPE 2bsh, k and v after repeat_kv (copies at n_heads) 2bsh each,
    #     output 2bsh (also wo's input: flash writes [b, s, heads, d], so no copy), fp32
    #     logsumexp 4bas, philox seed + offset (uint64 [2] and []) 24 bytes
    #   ffn_norm: input h 2bsh + rstd 4bs; w1/w3 input 2bsh
    #   SwiGLU: w1 out (silu input) 2bsf, silu out 2bsf, w3 out 2bsf, product (w2 input) 2bsf
    expected = 16 * b * s * h + 8 * b * s * f + 8 * b * s + 4 * b * a * s + 24
    assert _per_layer_saved("llama3-debug", "flash") == expected


def test_gpt_eager_saved_activations_match_korthikanti():
    b, s, h, a = 2, 256, 256, 8  # gpt-debug
    # Korthikanti et al. 2022, eq. 1: sbh(34 + 5as/h) per layer with 16-bit activations and
    # 1-byte dropout masks. The code also keeps LayerNorm's mean and rstd ([s, b, 1] each, two
    # LayerNorms, fp32 as the CUDA kernel keeps them): 4 * 4sb bytes, which the paper neglects.
    expected = s * b * h * (34 + 5 * a * s / h) + 16 * s * b
    assert _per_layer_saved("gpt-debug", "eager") == expected


def test_gpt_flash_saved_activations_per_layer_match_the_code():
    b, s, h, a = 2, 256, 256, 8
    # As eager, but the attention core saves no s x s tensor: instead its output 2sbh (which is
    # also the projection's input), fp32 logsumexp 4bas and the philox seed/offset (24 bytes);
    # the 5as^2b of softmax, dropout mask and dropout output disappear. 34sbh is kept:
    # LN1 out 2 + QKV 6 + attn out 2 + dropout mask 1 + LN2 in 2 + LN2 out 2 + fc1 out 8
    # + gelu out 8 + dropout mask 1 + next LN1 input 2.
    expected = 34 * s * b * h + 4 * b * a * s + 16 * s * b + 24
    assert _per_layer_saved("gpt-debug", "flash") == expected


def test_model_flops_match_torchtitan_formula(llama8b):
    seq, mb, n_mb = 512, 2, 3
    tr = run_rank(llama8b, dp_shard=8, seq_len=seq, micro_batch=mb, num_microbatches=n_mb)
    a = llama8b.args
    n_embedding = a.vocab_size * a.dim
    tokens = seq * mb * n_mb
    # torchtitan: 6 (N - N_embedding) + 12 L H Q T per token (H heads x Q head dim = dim).
    # simdist's model_flops = 3 x forward FLOPs, and torch's flop formulas count exactly
    # 2mnk per matmul (the embedding lookup is no matmul: 2 (N - N_emb) per token forward) and
    # 4 b s^2 dim per flash attention forward (q k^T and p v, causal masking not discounted):
    # 3 x (2 (N - N_emb - N_norm) + 4 L s dim): the formula, less the RMSNorm weights, which
    # it counts as if they were matmul weights (2 per block + the final norm, dim each).
    n_norm = (2 * a.n_layers + 1) * a.dim
    expected = (6 * (N_8B - n_embedding) + 12 * a.n_layers * a.dim * seq) * tokens
    assert tr.model_flops == expected - 6 * n_norm * tokens
    assert abs(tr.model_flops - expected) / expected < 1e-4  # the formula's own error


def _llama_block_fwd_flops(a, b: int, s: int) -> tuple[int, int]:  # noqa: ANN001
    """(matmul, flash attention) forward FLOPs of one llama3 block on b x s tokens:
    wq, wo [dim, dim], wk, wv [dim, kv*hd], w1, w3, w2 [dim, ffn]: 2 m n k each; flash
    attention (torch.utils.flop_counter.sdpa_flop_count): 2 bmm of 2 b heads s s hd."""
    mm = 2 * b * s * (2 * a.dim * a.dim + 2 * a.dim * a.n_kv_heads * a.head_dim
                      + 3 * a.dim * a.ffn_dim)
    return mm, 4 * b * s * s * a.dim


def test_executed_minus_model_flops_is_the_flash_backward_excess():
    # torch.utils.flop_counter: sdpa_flop_count (forward) = 2 matmuls of 2 b h s s d;
    # sdpa_backward_flop_count = 5 of them (recompute q k^T, grad v, grad p, grad q, grad k):
    # 2.5 x forward. Matmul backward is exactly 2 x forward (grad input + grad weight: every
    # matmul input here requires grad). model_flops = 3 x forward, so
    #   flops - model_flops = (1 + 2.5 - 3) x flash forward = 0.5 x 4 b s^2 h L n_mb
    #                       = 2 b s^2 h L n_mb.
    b, s, L, n_mb = 2, 256, 2, 3
    model = spec("llama3-debug", n_layers=L, seq_len=s)
    tr = run_rank(model, seq_len=s, micro_batch=b, num_microbatches=n_mb)
    h = model.args.dim
    assert tr.flops - tr.model_flops == 2 * b * s * s * h * L * n_mb
    mm, flash = _llama_block_fwd_flops(model.args, b, s)
    head = 2 * b * s * h * model.args.vocab_size
    assert tr.model_flops == 3 * n_mb * (L * (mm + flash) + head)


def test_full_recompute_adds_one_forward_of_each_block_up_to_its_last_saved_tensor():
    # Full AC wraps every TransformerBlock in torch.utils.checkpoint (non-reentrant). Backward
    # recomputes the block's forward, but with checkpoint's early stop (on by default) the
    # recompute ends as soon as every tensor backward needs is rebuilt: the block's last op
    # that saves something is w2's matmul input (silu(w1 x) * w3 x), so w2 itself (and the
    # residual add, which saves nothing) is not re-run. Executed FLOPs therefore grow by one
    # block forward minus w2 (2 b s dim ffn) per layer and micro-batch, model FLOPs not at all.
    b, s, L, n_mb = 2, 256, 2, 3
    model = spec("llama3-debug", n_layers=L, seq_len=s)
    a = model.args
    base = run_rank(model, seq_len=s, micro_batch=b, num_microbatches=n_mb)
    full = run_rank(model, seq_len=s, micro_batch=b, num_microbatches=n_mb,
                    activation_checkpointing="full")
    mm, flash = _llama_block_fwd_flops(a, b, s)
    w2 = 2 * b * s * a.dim * a.ffn_dim
    assert full.model_flops == base.model_flops
    assert full.flops == base.flops + L * n_mb * (mm - w2 + flash)


def test_fsdp_collectives_have_exact_bytes_per_unit():
    model = spec("llama3-debug")
    tr = run_rank(model, dp_shard=8, num_microbatches=2)
    rows = tr.collectives.to_pylist()
    a = model.args
    layer_params = (2 * a.dim * a.dim + 2 * a.dim * a.n_kv_heads * a.head_dim
                    + 3 * a.dim * a.ffn_dim + 2 * a.dim)
    root_params = 2 * a.vocab_size * a.dim + a.dim
    ag = [r for r in rows if r["kind"] == "all_gather"]
    rs = [r for r in rows if r["kind"] == "reduce_scatter"]
    assert {r["mesh_dim"] for r in rows} == {"dp_shard"} and {r["group_size"] for r in rows} == {8}
    # all-gathers carry bf16 parameters; reduce-scatters fp32 gradients (MixedPrecisionPolicy)
    assert {r["bytes"] for r in ag} == {2 * layer_params, 2 * root_params}
    assert {r["bytes"] for r in rs} == {4 * layer_params, 4 * root_params}
    # per micro-batch: forward all-gathers every unit; backward re-gathers every block but the
    # last (not resharded after forward) and the root; one reduce-scatter per unit.
    per_mb_ag = sum(r["count"] * r["bytes"] for r in ag) / 2
    assert per_mb_ag == 2 * (root_params + a.n_layers * layer_params + (a.n_layers - 1) * layer_params)
    per_mb_rs = sum(r["count"] * r["bytes"] for r in rs) / 2
    assert per_mb_rs == 4 * (root_params + a.n_layers * layer_params)


def test_ddp_per_microbatch_all_reduces_every_gradient_after_every_microbatch():
    model = spec("llama3-debug")
    tr = run_rank(model, dp_replicate=4, num_microbatches=3, grad_sync="per_microbatch")
    rows = tr.collectives.to_pylist()
    assert {r["kind"] for r in rows} == {"all_reduce"}
    assert {r["mesh_dim"] for r in rows} == {"dp_replicate"}
    n = count_params(build_model(model))
    assert sum(r["count"] * r["bytes"] for r in rows) == 3 * 4 * n  # fp32, every micro-batch


def _gpt_params_per_tp_rank(a, tp: int, seq_len: int) -> tuple[int, int]:  # noqa: ANN001
    """(one block, the root) parameters of a GPT rank under Megatron TP (derived from the plan in
    parallel/tensor_parallel.py): qkv and fc1 colwise (weight and bias split), proj and fc2
    rowwise (weight split, bias replicated), LayerNorms replicated; the tied [V, h] embedding
    vocab-sharded, the position table ([seq_len, h], max_seq_len = seq_len) and the final norm
    replicated."""
    h, f = a.dim, a.hidden_ffn
    block = (3 * h * h + 3 * h + h * h + h * f + f + f * h) // tp + 2 * h + 4 * h
    root = a.vocab_size * h // tp + seq_len * h + 2 * h
    return block, root


def _dp_sums(tr, kind: str, mesh_dim: str) -> tuple[int, int]:  # noqa: ANN001
    """(collectives, bytes) of one kind on one mesh dim over the step (row counts are weights)."""
    rows = [r for r in tr.collectives.to_pylist() if r["kind"] == kind and r["mesh_dim"] == mesh_dim]
    return sum(r["count"] for r in rows), sum(r["count"] * r["bytes"] for r in rows)


def test_gpt_tp_ddp_per_step_all_reduces_once_per_bucket_per_step():
    # The calibration row's shape (GPT, TP x DDP, full recompute, several micro-batches), small.
    model = spec("gpt-debug")
    a, tp, seq = model.args, 2, 256
    block, root = _gpt_params_per_tp_rank(a, tp, seq)
    per_rank = a.n_layers * block + root
    buckets = a.n_layers + 1  # one FSDP2 param group per block + the root (apply_ddp)
    kw = dict(dp_replicate=2, tp=tp, seq_len=seq, activation_checkpointing="full")
    for n in (2, 5):
        step = run_rank(model, num_microbatches=n, grad_sync="per_step", **kw)
        # fp32 gradient reduction (mixed_precision: reduce_dtype float32), once per step
        assert _dp_sums(step, "all_reduce", "dp_replicate") == (buckets, 4 * per_rank), n
        every = run_rank(model, num_microbatches=n, grad_sync="per_microbatch", **kw)
        assert _dp_sums(every, "all_reduce", "dp_replicate") == (n * buckets, n * 4 * per_rank), n
        # the fp32 gradients are all-reduced in place either way: the same memory
        assert step.peak_bytes == every.peak_bytes and step.grad_bytes == every.grad_bytes
        # auto is per_step for DDP
        auto = run_rank(model, num_microbatches=n, **kw)
        assert auto.collectives.equals(step.collectives)


def test_fsdp_per_step_reduce_scatters_once_and_holds_unsharded_grads():
    model = spec("llama3-debug")
    n_params = count_params(build_model(model))
    shard, n = 4, 4
    step = run_rank(model, dp_shard=shard, num_microbatches=n, grad_sync="per_step")
    every = run_rank(model, dp_shard=shard, num_microbatches=n, grad_sync="per_microbatch")
    units = model.args.n_layers + 1
    # reduce-scatter inputs are the unsharded fp32 gradients of each unit
    assert _dp_sums(step, "reduce_scatter", "dp_shard") == (units, 4 * n_params)
    assert _dp_sums(every, "reduce_scatter", "dp_shard") == (n * units, n * 4 * n_params)
    # parameters are all-gathered as before (forward and backward of every micro-batch)
    assert _dp_sums(step, "all_gather", "dp_shard") == _dp_sums(every, "all_gather", "dp_shard")
    # FSDP2 with requires_gradient_sync off keeps each unit's unsharded gradient, upcast to the
    # reduce dtype (fp32, `to_accumulated_grad_if_needed`), until the last micro-batch's
    # reduce-scatter: 4 bytes x all parameters held where per_microbatch holds the fp32 shards
    # (4 bytes x parameters / shard) it reduce-scattered into.
    assert step.peak_bytes - every.peak_bytes == 4 * n_params - 4 * n_params // shard
    assert step.grad_bytes == every.grad_bytes == 4 * n_params // shard
    # auto follows torchtitan's train_step for FSDP: a reduce-scatter after every micro-batch
    assert run_rank(model, dp_shard=shard, num_microbatches=n).collectives.equals(every.collectives)


def test_hsdp_auto_reduce_scatters_every_microbatch_and_all_reduces_once():
    model = spec("llama3-debug")
    n_params = count_params(build_model(model))
    rep, shard, n = 2, 2, 3
    units = model.args.n_layers + 1
    auto = run_rank(model, dp_replicate=rep, dp_shard=shard, num_microbatches=n)
    assert _dp_sums(auto, "reduce_scatter", "dp_shard") == (n * units, n * 4 * n_params)
    # the all-reduce carries the reduce-scattered fp32 shards, accumulated over the step
    assert _dp_sums(auto, "all_reduce", "dp_replicate") == (units, 4 * n_params // shard)
    step = run_rank(model, dp_replicate=rep, dp_shard=shard, num_microbatches=n, grad_sync="per_step")
    assert _dp_sums(step, "reduce_scatter", "dp_shard") == (units, 4 * n_params)
    assert _dp_sums(step, "all_reduce", "dp_replicate") == (units, 4 * n_params // shard)
    every = run_rank(model, dp_replicate=rep, dp_shard=shard, num_microbatches=n,
                     grad_sync="per_microbatch")
    assert _dp_sums(every, "all_reduce", "dp_replicate") == (n * units, n * 4 * n_params // shard)
    # accumulating the shards (auto) costs what keeping reduced shards costs (per_microbatch)
    assert auto.peak_bytes == every.peak_bytes
    assert step.peak_bytes - every.peak_bytes == 4 * n_params - 4 * n_params // shard


def test_grad_sync_auto_per_plan_kind():
    from simdist.parallel.data_parallel import PER_MICROBATCH, PER_STEP, GradSync, grad_sync_rule

    assert grad_sync_rule("auto", 8, 1, 3) == PER_STEP  # DDP: no_sync until the last
    assert grad_sync_rule("auto", 1, 8, 3) == PER_MICROBATCH  # FSDP: torchtitan
    assert grad_sync_rule("auto", 1, 1, 3) == PER_MICROBATCH  # one GPU (FSDP over one rank)
    assert grad_sync_rule("auto", 2, 4, 3) == GradSync(reduce=True, all_reduce=False)  # HSDP
    # ZeRO-1/2 are not FSDP2: their own rule, nothing to toggle
    assert not grad_sync_rule("auto", 1, 8, 1).last_differs
    assert not grad_sync_rule("auto", 1, 8, 2).last_differs
    for kind in [(8, 1), (1, 8), (2, 4)]:
        assert grad_sync_rule("per_step", *kind, 3) == PER_STEP
        assert grad_sync_rule("per_microbatch", *kind, 3) == PER_MICROBATCH


PLANS = {"ddp": dict(dp_replicate=4), "fsdp": dict(dp_shard=4),
         "hsdp": dict(dp_replicate=2, dp_shard=2)}


@pytest.mark.parametrize("grad_sync", ["per_step", "per_microbatch", "auto"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_repeated_microbatches_equal_full_execution(plan, grad_sync):
    from simdist.parallel.data_parallel import grad_sync_rule

    model = spec("llama3-debug")
    kw = dict(PLANS[plan], num_microbatches=4, grad_sync=grad_sync)
    short = run_rank(model, **kw)
    full = run_rank(model, all_microbatches=True, **kw)
    # first, middle (weight 2), last where the last reduces what the others hold back;
    # else first and second (weight 3)
    last_differs = grad_sync_rule(grad_sync, kw.get("dp_replicate", 1), kw.get("dp_shard", 1),
                                  3).last_differs
    assert short.executed_microbatches == (3 if last_differs else 2)
    assert full.executed_microbatches == 4
    for field in ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
                  "other_bytes", "peak_phase", "peak_module", "flops", "model_flops", "hbm_bytes",
                  "comm_bytes"):
        assert getattr(short, field) == getattr(full, field), field
    key = lambda t: sorted(map(str, t.to_pylist()))  # noqa: E731
    assert key(short.ops) == key(full.ops)
    assert key(short.collectives) == key(full.collectives)


def test_full_recompute_keeps_only_block_inputs():
    # Korthikanti et al.: full recompute stores 2sbh per layer (the block input).
    b, s, h = 2, 256, 256
    assert _per_layer_saved("gpt-debug", "eager", ac="full") == 2 * s * b * h
    assert _per_layer_saved("llama3-debug", "flash", ac="full") == 2 * b * s * h


def test_selective_recompute_drops_the_attention_core():
    # Korthikanti et al.: selective recompute stores 34sbh per layer (the 5as^2b term goes);
    # plus LayerNorm statistics 16sb as above.
    b, s, h = 2, 256, 256
    assert _per_layer_saved("gpt-debug", "eager", ac="selective") == 34 * s * b * h + 16 * s * b


def test_op_level_checkpointing_keeps_every_other_matmul_and_attention():
    b, s, h, a, kv, d, f = 2, 256, 256, 16, 4, 16, 768
    # torchtitan's op policy on a llama block: block input 2bsh; of the matmuls wq, wk, wv, wo,
    # w1, w3, w2 the 1st, 3rd, 5th, 7th outputs are kept (wq 2bsh, wv 2bs*kv*d, w1 2bsf,
    # w2 2bsh); flash attention's output 2bsh, logsumexp 4bas and philox state 24 bytes.
    expected = 2 * b * s * h + 2 * b * s * h + 2 * b * s * kv * d + 2 * b * s * f + 2 * b * s * h
    expected += 2 * b * s * h + 4 * b * a * s + 24
    assert _per_layer_saved("llama3-debug", "flash", ac="op") == expected


def _recomputed_fwd_flops(a, b: int, s: int, ac: str) -> int:  # noqa: ANN001
    """Forward FLOPs one block re-runs in backward under each checkpointing mode (llama3,
    b x s tokens): 2 m n k per matmul, 4 b s^2 dim per flash attention forward.
    - full: the whole block up to its last op that saves a tensor (checkpoint's early stop),
      so all but w2 (see the test above);
    - selective: the attention core, one flash attention forward;
    - op (torchtitan's op SAC, its matmul count restarting at every block's checkpoint): the
      outputs of wq, wv, w1, w2 (matmuls 1, 3, 5, 7) and of flash attention are kept, so the
      recompute re-runs wk (its output becomes k, which flash's backward needs), wo (its
      output feeds the residual that ffn_norm saves) and w3 (its output is saved by the SwiGLU
      product); w2's output is needed by nothing, so early stop ends before it."""
    mm, flash = _llama_block_fwd_flops(a, b, s)
    wk = 2 * b * s * a.dim * a.n_kv_heads * a.head_dim
    wo, w3, w2 = (2 * b * s * a.dim * n for n in (a.dim, a.ffn_dim, a.ffn_dim))
    return {"full": mm - w2 + flash, "selective": flash, "op": wk + wo + w3}[ac]


@pytest.mark.parametrize("ac", ["full", "selective", "op"])
def test_recompute_adds_executed_flops_but_not_model_flops(ac):
    b, s, L = 2, 256, 2
    model = spec("llama3-debug", n_layers=L, seq_len=s)
    base = run_rank(model, micro_batch=b, seq_len=s)
    tr = run_rank(model, activation_checkpointing=ac, micro_batch=b, seq_len=s)
    assert tr.model_flops == base.model_flops
    # the recomputed forward runs in the backward phase; nothing else changes
    assert tr.flops == base.flops + L * _recomputed_fwd_flops(model.args, b, s, ac)
    fwd = lambda t: sum(r["flops"] for r in t.ops.to_pylist() if r["phase"] == "fwd")  # noqa: E731
    assert fwd(tr) == fwd(base)
