"""ZeRO-1/2/3 model states per rank against the ZeRO paper's accounting (Rajbhandari et al.
2020): 4psi + 12psi/N, 2psi + 14psi/N, 16psi/N for mixed-precision Adam."""

from __future__ import annotations

import pytest
from conftest import run_rank, spec

from simdist.families import build_model, count_params

EXPECTED = {
    1: lambda psi, n: 4 * psi + 12 * psi // n,
    2: lambda psi, n: 2 * psi + 14 * psi // n,
    3: lambda psi, n: 16 * psi // n,
}


def _check(model, stage: int, n: int) -> None:  # noqa: ANN001
    sizes = [p.numel() for p in build_model(model, "meta").parameters()]
    psi = sum(sizes)
    # Exact, not within 1%: every tensor of the 7.5B GPT's shapes divides by n (ZeRO-1/2 pad
    # each flattened tensor to n equal chunks, FSDP2 shards dim 0: no padding either way)...
    assert all(k % n == 0 for k in sizes) and psi % n == 0
    tr = run_rank(model, dp_shard=n, zero_stage=stage, seq_len=128, num_microbatches=2)
    states = tr.param_bytes + tr.grad_bytes + tr.optimizer_bytes
    # ...plus AdamW's step counters: one fp32 scalar per parameter tensor (torch.optim.adam,
    # capturable and fused off), on every rank whatever the stage (ZeroOptimizer steps one
    # AdamW over the per-tensor master shards).
    assert states == EXPECTED[stage](psi, n) + 4 * len(sizes)
    bf16_whole, fp32_shard = 2 * psi, 4 * psi // n
    assert tr.param_bytes == {1: bf16_whole, 2: bf16_whole, 3: fp32_shard}[stage]
    assert tr.grad_bytes == {1: bf16_whole, 2: 2 * psi // n, 3: fp32_shard}[stage]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("n", [4, 16, 64])
def test_model_states_match_the_zero_paper(stage, n):
    # the 7.5B GPT's shapes (h 4096, vocab 51200) with 4 of its 36 layers: the accounting is
    # per parameter, so the ratio to psi does not depend on depth (the full model: -m slow)
    _check(spec("gpt-7.5b", seq_len=128, n_layers=4), stage, n)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("n", [4, 16, 64])
def test_model_states_match_the_zero_paper_full_7_5b(stage, n):
    _check(spec("gpt-7.5b", seq_len=128), stage, n)


def test_zero2_reduce_scatters_gradients_as_they_are_produced():
    model = spec("gpt-debug")
    z1 = run_rank(model, dp_shard=4, zero_stage=1, num_microbatches=2)
    z2 = run_rank(model, dp_shard=4, zero_stage=2, num_microbatches=2)

    def phases(tr, kind):  # noqa: ANN001, ANN202
        return {r["phase"] for r in tr.collectives.to_pylist() if r["kind"] == kind}

    # ZeRO-1 reduces once, at the optimizer step; ZeRO-2 during backward, every micro-batch
    assert phases(z1, "reduce_scatter") == {"optim"}
    assert phases(z2, "reduce_scatter") == {"bwd"}
    # both all-gather the updated bf16 parameters after the step
    assert phases(z1, "all_gather") == phases(z2, "all_gather") == {"optim"}
    assert z2.peak_bytes < z1.peak_bytes
