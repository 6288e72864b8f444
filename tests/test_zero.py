"""ZeRO-1/2/3 model states per rank against the ZeRO paper's accounting (Rajbhandari et al.
2020): 4psi + 12psi/N, 2psi + 14psi/N, 16psi/N for mixed-precision Adam."""

from __future__ import annotations

import pytest
from conftest import run_rank, spec

from simdist.families import build_model

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
    # ...plus AdamW's step counters: one fp32 scalar per optimized tensor (torch.optim.adam,
    # capturable and fused off): FSDP2 steps the parameters, ZeroOptimizer one master shard per
    # bucket: one per block and one for the parameters outside the blocks.
    tensors = len(sizes) if stage == 3 else model.n_layers + 1
    assert states == EXPECTED[stage](psi, n) + 4 * tensors
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


# --- under tensor parallelism (Megatron-LM's distributed optimizer) -------------------------

def test_zero_with_tp_holds_the_tp_shards_and_matches_fsdp2s_optimizer_state():
    # A second execution path for the same bytes: FSDP2 (zero_stage 3) over the same tp x dp
    # keeps fp32 parameters and two fp32 moments sharded over dp of the TP-local tensors, ZeRO-1
    # keeps the fp32 master and the two moments: 12 bytes per TP-local element / N either way
    # (every llama3-debug tensor divides by tp x dp = 4, so neither pads).
    model = spec("llama3-debug")
    local = sum(p.numel() for p in build_model(model, "meta").parameters()) // 2  # tp halves all
    z1 = run_rank(model, tp=2, dp_shard=2, zero_stage=1, num_microbatches=2)
    fsdp = run_rank(model, tp=2, dp_shard=2, zero_stage=3, num_microbatches=2)
    # step counters: FSDP2's AdamW one per parameter, ZeRO's one per bucket (per block + root)
    n_tensors = len(list(build_model(model, "meta").parameters()))
    assert (z1.optimizer_bytes == fsdp.optimizer_bytes + fsdp.param_bytes
            - 4 * (n_tensors - (model.n_layers + 1)))
    assert z1.param_bytes == 2 * local + 2 * _replicated_elements(model)


def _replicated_elements(model) -> int:  # noqa: ANN001
    # norm weights are replicated over TP (torchtitan's plan: SequenceParallel keeps them whole)
    return sum(p.numel() for n, p in build_model(model, "meta").named_parameters()
               if "norm" in n) // 2


def test_zero1_overlap_moves_the_reductions_not_the_bytes():
    model = spec("llama3-debug")
    kw = dict(tp=2, dp_shard=2, zero_stage=1, num_microbatches=3)
    plain = run_rank(model, **kw)
    over = run_rank(model, zero_overlap_grad_reduce=True, zero_overlap_param_gather=True, **kw)

    def by(tr, kind):  # noqa: ANN001, ANN202
        rows = [r for r in tr.collectives.to_pylist()
                if r["kind"] == kind and r["mesh_dim"] == "dp_shard"]
        return {r["phase"] for r in rows}, sum(r["count"] * r["bytes"] for r in rows)

    # Megatron: without the flags both run at the optimizer step; with them the reduce-scatter
    # runs in the last micro-batch's backward and the all-gather in the (next) first forward
    assert by(plain, "reduce_scatter")[0] == by(plain, "all_gather")[0] == {"optim"}
    assert by(over, "reduce_scatter")[0] == {"bwd"}
    assert by(over, "all_gather")[0] == {"fwd"}
    assert by(over, "reduce_scatter")[1] == by(plain, "reduce_scatter")[1]
    assert by(over, "all_gather")[1] == by(plain, "all_gather")[1]
    # in place (NCCL's in-place reduce-scatter / all-gather): the same model states. (Under TP
    # the plain run holds DTensor's whole embedding gradient and the norms' Partial ones until
    # the step, where the overlapped run has reduced them in backward: compared without TP.)
    plain1 = run_rank(model, dp_shard=4, zero_stage=1, num_microbatches=3)
    over1 = run_rank(model, dp_shard=4, zero_stage=1, num_microbatches=3,
                     zero_overlap_grad_reduce=True, zero_overlap_param_gather=True)
    for f in ("param_bytes", "optimizer_bytes"):
        assert getattr(over1, f) == getattr(plain1, f), f
    # the overlapped run holds the reduced bf16 shards (2 psi / N, DeepSpeed's averaged
    # gradient partitions) beside the whole gradients when the step begins
    psi = sum(p.numel() for p in build_model(model, "meta").parameters())
    assert over1.grad_bytes == plain1.grad_bytes + 2 * psi // 4
    assert plain1.grad_bytes == 2 * psi


def test_zero1_with_megatrons_fp32_main_grad():
    # Megatron-LM's distributed-optimizer table (docs: "bf16 param, fp32 grads"): 6 + 12/d bytes
    # per parameter: bf16 parameters 2, the fp32 main_grad buffer 4, the fp32 master, momentum
    # and variance sharded 12/d (plus one AdamW step counter per bucket, as above).
    model = spec("gpt-7.5b", seq_len=128, n_layers=4)
    psi = sum(p.numel() for p in build_model(model, "meta").parameters())
    n = 4
    fp32 = run_rank(model, dp_shard=n, zero_stage=1, zero_grad_dtype="fp32", seq_len=128,
                    num_microbatches=2)
    bf16 = run_rank(model, dp_shard=n, zero_stage=1, seq_len=128, num_microbatches=2)
    assert fp32.param_bytes == 2 * psi and fp32.grad_bytes == 4 * psi
    assert (fp32.param_bytes + fp32.grad_bytes + fp32.optimizer_bytes
            == 6 * psi + 12 * psi // n + 4 * (model.n_layers + 1))

    def rs_bytes(tr):  # noqa: ANN001, ANN202
        return sum(r["count"] * r["bytes"] for r in tr.collectives.to_pylist()
                   if r["kind"] == "reduce_scatter")

    assert rs_bytes(fp32) == 2 * rs_bytes(bf16)  # the reduce-scatter moves fp32
