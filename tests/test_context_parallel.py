"""Context parallelism: torch's ring attention on sequence shards, K/V exchange recorded."""

from __future__ import annotations

from conftest import collective_counts, llama3_saved_bytes, run_rank, spec

S, CP, L = 512, 4, 2


def _per_op(tr, phase, predicate):  # noqa: ANN001, ANN202
    return sum(r["flops"] for r in tr.ops.to_pylist() if r["phase"] == phase and predicate(r["op"]))


def test_cp_shards_sequence_parameters_and_exchanges_kv():
    model = spec("llama3-debug", n_layers=L, seq_len=S)
    a = model.args
    base = run_rank(model, dp_shard=2, seq_len=S)
    tr = run_rank(model, dp_shard=2, cp=CP, seq_len=S)
    # FSDP shards over dp_shard x cp: parameters / (2 * CP) exactly
    assert tr.param_bytes * CP == base.param_bytes
    # every linear layer sees S / CP tokens: matmul FLOPs exactly 1 / CP
    mm = lambda op: op in ("mm", "addmm")  # noqa: E731
    assert _per_op(tr, "fwd", mm) * CP == _per_op(base, "fwd", mm)
    # ring attention: each layer's forward all-gathers the K and V shards of the CP group
    # (after repeat_kv: n_heads heads), backward gathers again and rotates the K/V gradients
    c = collective_counts(tr, "cp")
    kv = 2 * (1 * a.n_heads * S * a.head_dim * 2)  # K and V, bf16, whole sequence
    assert c[("fwd", "all_gather", kv)] == L
    assert c[("bwd", "all_gather", kv)] == L
    # and rotates cat(dK, dV) of its S / CP tokens, fp32, once per ring step (all-to-all)
    dkv = 2 * (1 * a.n_heads * (S // CP) * a.head_dim * 4)
    assert c[("bwd", "all_to_all", dkv)] == CP * L
    # Saved activations, tensor by tensor (conftest.llama3_saved_bytes): everything on S / CP
    # tokens, except per layer wo's input on CP rank 0, a copy of ring attention's merged
    # [b, heads, s, d] output (+2bsh/CP; CUDA flash's own output is laid out [b, s, heads, d]
    # and wo's input a view of it) and the 24 B flash rng state; per step
    # the whole RoPE tables (2 x 2 x S x head_dim) and the fp32 total_weight scalar.
    assert base.activation_bytes == llama3_saved_bytes(a, batch=1, seq_len=S, n_layers=L)
    assert tr.activation_bytes == llama3_saved_bytes(a, batch=1, seq_len=S, n_layers=L, cp=CP)


def _fsdp_bytes(a, n_layers: int) -> int:  # noqa: ANN001
    """FSDP2 bytes per micro-batch of a llama3 (see test_accounting's exact-bytes test): bf16
    all-gathers of every unit forward and of all but the last block and the root backward,
    fp32 reduce-scatters of every unit (bytes = the unsharded unit)."""
    layer = (2 * a.dim * a.dim + 2 * a.dim * a.n_kv_heads * a.head_dim + 3 * a.dim * a.ffn_dim
             + 2 * a.dim)
    root = 2 * a.vocab_size * a.dim + a.dim
    return 2 * (root + n_layers * layer + (n_layers - 1) * layer) + 4 * (root + n_layers * layer)


def test_cp_collective_bytes_and_attention_flops_are_exact():
    model = spec("llama3-debug", n_layers=L, seq_len=S)
    a = model.args
    b, heads, hd = 1, a.n_heads, a.head_dim
    local = S // CP  # tokens per rank (two head-tail chunks of S / 2CP)
    for rank in (0, CP - 1):
        tr = run_rank(model, dp_shard=2, cp=CP, seq_len=S, rank=rank)
        c = collective_counts(tr, "cp")
        # torch's _templated_ring_attention (rotate_method allgather): forward all-gathers
        # cat(K, V) once per layer (bytes: the gathered bf16 output, whole sequence);
        # backward gathers K/V again, and its dK/dV rotater is always _AllToAllRotater
        # (permute_tensor = one all-to-all per ring step, cp steps) of cat(dK, dV) of the local
        # K/V in the fp32 accumulation dtype (_cp_options.convert_to_f32).
        kv_gathered = 2 * b * heads * S * hd * 2
        dkv_local = 2 * b * heads * local * hd * 4
        assert dict(c) == {("fwd", "all_gather", kv_gathered): L,
                           ("bwd", "all_gather", kv_gathered): L,
                           ("bwd", "all_to_all", dkv_local): CP * L}
        # the rest is FSDP2 over dp_shard x cp (8 ranks), unchanged by the sequence split
        assert tr.comm_bytes == _fsdp_bytes(a, L) + sum(k[2] * n for k, n in c.items())
        # Attention FLOPs (torch's sdpa formula: 4 b heads q_len kv_len hd forward, 2.5x
        # backward; causal masking not discounted). Load balancing gives every rank the same
        # work: ring step 0 is local (q and kv of `local` tokens, is_causal); each of the cp-1
        # other steps runs either all local queries on half the received kv (i <= rank) or
        # half the queries on all of it (i > rank): local x local / 2.
        step0 = 4 * b * heads * local * local * hd
        fwd = L * (step0 + (CP - 1) * step0 // 2)
        assert _per_op(tr, "fwd", lambda op: "flash_attention" in op) == fwd
        assert _per_op(tr, "bwd", lambda op: "flash_attention" in op) == fwd * 5 // 2
        # saved activations (conftest.llama3_saved_bytes): the last CP rank's ring never takes
        # a half-query step, so its attention output keeps flash's layout and wo's input is a
        # view, 2 b local h bytes per layer fewer than rank 0
        assert tr.activation_bytes == llama3_saved_bytes(a, batch=b, seq_len=S, n_layers=L,
                                                         cp=CP, cp_rank=rank)
