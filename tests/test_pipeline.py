"""Pipeline parallelism: the schedule's real action order decides the activations in flight."""

from __future__ import annotations

import pytest
from conftest import run_rank, spec

from simdist.families import build_model, count_params
from simdist.parallel.pipeline import split_layers

B, S, PP, N_MB = 2, 256, 4, 8
# llama3-debug: b=2, s=256, h=256, 16 heads (d=16), 4 kv heads, ffn 768 (see test_accounting)
H, A, F, D = 256, 16, 768, 16
PER_LAYER = 16 * B * S * H + 8 * B * S * F + 8 * B * S + 4 * B * A * S + 24
ROPE = 2 * (S * D * 2)  # the bf16 cos and sin cast once per forward, kept by the RoPE muls
RECV = 2 * B * S * H    # one received activation buffer per micro-batch


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return spec("llama3-debug", n_layers=8, seq_len=S)


@pytest.fixture(scope="module")
def one_f_one_b(model):  # noqa: ANN001, ANN201
    return [run_rank(model, rank=r, pp=PP, num_microbatches=N_MB, micro_batch=B) for r in range(PP)]


def test_1f1b_stage_i_holds_p_minus_i_microbatches(one_f_one_b):
    act = [tr.activation_bytes for tr in one_f_one_b]
    # A middle stage (2 layers) keeps per micro-batch in flight: its layers' saved tensors, less
    # the first block's input (that is the received buffer, counted once per micro-batch below),
    # plus the RoPE tables of that forward.
    per_mb = 2 * PER_LAYER - 2 * B * S * H + ROPE
    # torch.distributed.pipelining allocates one receive buffer per micro-batch for the step.
    assert act[1] == (PP - 1) * per_mb + N_MB * RECV
    assert act[2] == (PP - 2) * per_mb + N_MB * RECV
    # the first stage holds p micro-batches: most of all
    assert act[0] > act[1] > act[2]


def test_pipeline_stages_hold_their_own_parameters(one_f_one_b, model):
    a = model.args
    layer = count_params(build_model(spec("llama3-debug", n_layers=1))) - 2 * a.vocab_size * a.dim - a.dim
    emb = a.vocab_size * a.dim
    expected = [2 * layer + emb, 2 * layer, 2 * layer, 2 * layer + emb + a.dim]
    assert [tr.param_bytes for tr in one_f_one_b] == [4 * n for n in expected]
    # every p2p message is one bf16 [b, s, h] activation (forward) or its gradient (backward)
    for tr in one_f_one_b:
        rows = tr.collectives.to_pylist()
        assert {r["kind"] for r in rows} <= {"send", "recv"}
        assert {r["bytes"] for r in rows} == {B * S * H * 2}
        assert sum(r["count"] for r in rows if r["kind"] == "send") == N_MB * (1 if tr.rank in (0, PP - 1) else 2)


def test_gpipe_holds_every_microbatch(model):
    tr = run_rank(model, rank=1, pp=PP, num_microbatches=N_MB, micro_batch=B, pp_schedule="gpipe")
    per_mb = 2 * PER_LAYER - 2 * B * S * H + ROPE
    assert tr.activation_bytes == N_MB * per_mb + N_MB * RECV


def _inflight_layers(schedule_rank_order, layers_per_stage) -> int:  # noqa: ANN001
    """Peak over the schedule's action list of sum(in-flight micro-batches x stage layers)."""
    inflight: dict[int, int] = {}
    peak = 0
    for action in schedule_rank_order:
        if action is None:
            continue
        kind = action.computation_type.value
        if kind == "F":
            inflight[action.stage_index] = inflight.get(action.stage_index, 0) + 1
        elif kind in ("B", "I"):  # full backward, or its input-grad half
            inflight[action.stage_index] -= 1
        peak = max(peak, sum(n * layers_per_stage for n in inflight.values()))
    return peak


def test_interleaved_first_stage_follows_the_schedule_order(model):
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    v = 2
    tr = run_rank(model, rank=0, pp=PP, num_microbatches=N_MB, micro_batch=B,
                  pp_schedule="interleaved_1f1b", pp_virtual_stages=v)
    # Independent expectation: replay the schedule's own action order for rank 0.
    class _Stage:  # the order depends only on the stage count and group size
        def __init__(self, i: int) -> None:
            self.stage_index, self.group_size, self.group_rank = i, PP, 0
            self.num_stages = PP * v
            self.is_first, self.is_last = i == 0, i == PP * v - 1
            self.has_backward = True
            self.submod = None

    order = ScheduleInterleaved1F1B([_Stage(0), _Stage(PP)], N_MB).pipeline_order[0]
    layers = 8 // (PP * v)
    peak_layer_mbs = _inflight_layers(order, layers)
    # the Narayanan et al. factor: p (1 + (p-1)/(p v)) stage micro-batches = 5.5 for p=4, v=2
    assert peak_layer_mbs == pytest.approx(PP * (1 + (PP - 1) / (PP * v)) * (8 // PP), rel=0.1)
    per_layer_mb = PER_LAYER  # first stage: its block inputs are embedding outputs, not buffers
    assert tr.activation_bytes == pytest.approx(peak_layer_mbs * per_layer_mb, rel=0.03)


def test_uneven_split_puts_the_peak_on_the_heaviest_stage():
    model = spec("llama3-debug", n_layers=8, seq_len=S)
    pp_layers = (1, 5, 1, 1)
    trs = [run_rank(model, rank=r, pp=PP, num_microbatches=N_MB, micro_batch=B,
                    pp_layers=pp_layers) for r in range(PP)]
    assert split_layers(8, 4, list(pp_layers))[1] == [1, 2, 3, 4, 5]
    heavy = max(trs, key=lambda t: t.peak_bytes)
    assert heavy.rank == 1
    a = model.args
    layer = count_params(build_model(spec("llama3-debug", n_layers=1))) - 2 * a.vocab_size * a.dim - a.dim
    assert heavy.param_bytes == 4 * 5 * layer  # exactly its five blocks, fp32


@pytest.mark.parametrize("dp", [dict(dp_shard=2), dict(dp_replicate=2),
                                dict(dp_replicate=2, dp_shard=2)], ids=["fsdp", "ddp", "hsdp"])
def test_pipelining_reduces_gradients_once_per_step(dp):
    # torch.distributed.pipelining's stage turns FSDP2's gradient sync off for every backward
    # (backward_maybe_with_nosync) and reduces after the last (perform_reduce_grad): once per
    # step whatever the micro-batch count, which grad_sync auto (and per_step) keep.
    from functools import partial

    from simdist.config import ParallelConfig
    from simdist.parallel.pipeline import stage_parts

    m = spec("llama3-debug", n_layers=4, seq_len=S)
    (_, stage0), = stage_parts(partial(build_model, m, "meta"), 4, ParallelConfig(pp=2), 0)
    n_stage = sum(p.numel() for p in stage0.parameters())
    units = len(stage0.layers) + 1
    shard = dp.get("dp_shard", 1)
    for n in (2, 4):
        tr = run_rank(m, pp=2, num_microbatches=n, **dp)
        sums = {}
        for r in tr.collectives.to_pylist():
            if r["kind"] in ("reduce_scatter", "all_reduce"):
                c = sums.setdefault((r["kind"], r["mesh_dim"]), [0, 0])
                c[0] += r["count"]
                c[1] += r["count"] * r["bytes"]
        expected = {}
        if shard > 1:
            expected[("reduce_scatter", "dp_shard")] = [units, 4 * n_stage]
        if dp.get("dp_replicate", 1) > 1:
            expected[("all_reduce", "dp_replicate")] = [units, 4 * n_stage // shard]
        assert sums == expected, n
