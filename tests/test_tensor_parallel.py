"""Tensor + sequence parallelism through DTensor: collectives per layer follow the module
structure, shards and FLOPs split exactly."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import collective_counts, llama3_saved_bytes, run_rank, spec

from simdist.families import build_model, count_params

L, B, S = 2, 2, 256


def _tp_collectives(tr) -> Counter:  # noqa: ANN001
    return collective_counts(tr, "tp")


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return spec("llama3-debug", n_layers=L, seq_len=S)


def test_tp_without_sp_all_reduces_per_module_input_and_output(model):
    a = model.args
    act = B * S * a.dim * 2  # one bf16 [b, s, h] activation
    c = _tp_collectives(run_rank(model, tp=4, micro_batch=B, sequence_parallel=False))
    # forward: the rowwise wo and w2 of every layer reduce their partial outputs, and the rowwise
    # embedding its output.
    assert c[("fwd", "all_reduce", act)] == 2 * L + 1
    # backward: the input gradient of each replicated module input is all-reduced once — the
    # attention input (shared by wq/wk/wv as one Replicate DTensor, whose three partial grads
    # DTensor sums locally) and the feed-forward input (shared by w1/w3), plus the output head.
    assert c[("bwd", "all_reduce", act)] == 2 * L + 1
    # loss_parallel: max, sum-exp and target logit over the vocab shards (fp32 per token)
    assert c[("fwd", "all_reduce", B * S * 4)] == 3
    assert not [k for k in c if k[1] in ("all_gather", "reduce_scatter")]


def test_tp_with_sp_gathers_and_scatters_the_sequence(model):
    a = model.args
    act = B * S * a.dim * 2
    c = _tp_collectives(run_rank(model, tp=4, micro_batch=B, sequence_parallel=True))
    # forward: all-gather before attention, feed-forward and the head; reduce-scatter after wo,
    # w2 and the embedding. Backward mirrors it.
    for phase in ("fwd", "bwd"):
        assert c[(phase, "all_gather", act)] == 2 * L + 1
        assert c[(phase, "reduce_scatter", act)] == 2 * L + 1
    # replicated RMSNorm weights see sequence-sharded inputs: their grads are all-reduced
    assert c[("bwd", "all_reduce", a.dim * 2)] == 2 * L + 1


def test_tp_shards_parameters_and_flops_exactly(model):
    a = model.args
    n = count_params(build_model(model))
    norms = (2 * L + 1) * a.dim  # RMSNorm weights are replicated over tp
    tp1 = run_rank(model, dp_shard=2, micro_batch=B)
    tp4 = run_rank(model, tp=4, dp_shard=2, micro_batch=B)
    assert tp1.param_bytes == 4 * n // 2
    assert tp4.param_bytes == 4 * ((n - norms) // 4 + norms) // 2
    assert tp4.flops * 4 == tp1.flops
    assert tp4.model_flops * 4 == tp1.model_flops
    # Saved activations, tensor by tensor (conftest.llama3_saved_bytes). Against tp1 / 4, each
    # TP4 + SP layer keeps 294,930 B more: the gathered [b, s, h] inputs of wq/wk/wv and w1/w3
    # (2 x 2bsh x 3/4 = 393,216), less k and v, which with one kv head per rank are views of
    # that head (repeat_kv's reshape of the expand copies nothing): 2 x 2bsd x (16/4 - 1) =
    # -98,304; and the unsharded flash rng state, 24 x 3/4 = 18.
    assert tp1.activation_bytes == llama3_saved_bytes(a, batch=B, seq_len=S, n_layers=L)
    assert tp4.activation_bytes == llama3_saved_bytes(a, batch=B, seq_len=S, n_layers=L, tp=4,
                                                      sequence_parallel=True)


def test_tp_collectives_are_exactly_the_derived_set(model):
    # Every collective of the step, not only the ones named above: a TP-only plan (FSDP over
    # one rank issues none), so comm_bytes is their sum.
    a = model.args
    act = B * S * a.dim * 2
    per_token_fp32 = B * S * 4
    no_sp = run_rank(model, tp=4, micro_batch=B, sequence_parallel=False)
    assert dict(_tp_collectives(no_sp)) == {
        ("fwd", "all_reduce", act): 2 * L + 1, ("bwd", "all_reduce", act): 2 * L + 1,
        ("fwd", "all_reduce", per_token_fp32): 3}
    assert no_sp.comm_bytes == 2 * (2 * L + 1) * act + 3 * per_token_fp32
    # without SP the norms and their inputs stay replicated [b, s, h] (conftest's derivation)
    assert no_sp.activation_bytes == llama3_saved_bytes(a, batch=B, seq_len=S, n_layers=L, tp=4)
    sp = run_rank(model, tp=4, micro_batch=B, sequence_parallel=True)
    expected = {("fwd", "all_gather", act): 2 * L + 1, ("fwd", "reduce_scatter", act): 2 * L + 1,
                ("bwd", "all_gather", act): 2 * L + 1, ("bwd", "reduce_scatter", act): 2 * L + 1,
                ("bwd", "all_reduce", a.dim * 2): 2 * L + 1,
                ("fwd", "all_reduce", per_token_fp32): 3}
    assert dict(_tp_collectives(sp)) == expected
    assert sp.comm_bytes == sum(k[2] * n for k, n in expected.items())
