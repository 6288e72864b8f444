"""Context parallelism: torch's ring attention on sequence shards, K/V exchange recorded."""

from __future__ import annotations

from conftest import collective_counts, run_rank, spec

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
    assert sum(n for (ph, kind, _), n in c.items() if ph == "bwd" and kind == "all_to_all") > 0
    # activations shrink with the sequence shard
    assert tr.activation_bytes < base.activation_bytes / 2
