"""Pipeline parallelism: the schedule's real action order decides the activations in flight."""

from __future__ import annotations

import pytest
from conftest import run_rank, spec

from simdist.families import build_model, count_params
from simdist.parallel.pipeline import split_layers

B, S, PP, N_MB, LAYERS = 2, 256, 4, 8, 8
# llama3-debug: b=2, s=256, h=256, 16 heads (d=16), 4 kv heads, ffn 768, vocab 2048
H, A, F, D, V = 256, 16, 768, 16, 2048
# Saved for backward, per block and micro-batch (derived term by term in test_accounting's
# test_llama3_saved_activations_per_layer_match_the_code)
PER_LAYER = 16 * B * S * H + 8 * B * S * F + 8 * B * S + 4 * B * A * S + 24
ROPE = 2 * (S * D * 2)  # the bf16 cos and sin cast once per forward, kept by the RoPE muls
RECV = 2 * B * S * H    # one received activation buffer per micro-batch
# The last stage, per micro-batch: final norm input 2bsh + fp32 rstd 4bs, head input (norm
# output) 2bsh, log_softmax's fp32 output 4bsV (cross-entropy in fp32), nll_loss's fp32
# total_weight scalar 4.
HEAD = 2 * B * S * H + 4 * B * S + 2 * B * S * H + 4 * B * S * V + 4
# Token ids and targets: the schedule chunks one [b n, s] int64 tensor of each; a chunk is a
# view, so the embedding (ids) and nll_loss (targets) keep the whole storage saved, once.
BATCH_IDS = 8 * B * N_MB * S
# Zero bubble: the input-gradient pass (I, stage_backward_input) frees nothing but nll_loss's
# total_weight on the last stage; the weight pass (W) frees the rest except the part of the
# graph W never walks, which stays alive (with torch 2.13, until the step ends; the first stage
# has no input gradient and its W frees all): flash attention's q, k, v, out 4 x 2bsh, fp32
# logsumexp 4bas, philox state 24 bytes and the RoPE tables; on the last stage also
# log_softmax's output 4bsV and the SwiGLU's silu input, silu output and w3 output 3 x 2bsf.
ZB_KEPT_MIDDLE = 4 * 2 * B * S * H + 4 * B * A * S + 24 + ROPE
ZB_KEPT_LAST = ZB_KEPT_MIDDLE + 4 * B * S * V + 3 * 2 * B * S * F
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


def _stages(schedule: str) -> int:
    return PP * (2 if schedule in ("interleaved_1f1b", "zero_bubble") else 1)


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return spec("llama3-debug", n_layers=LAYERS, seq_len=S)


_TRACES: dict = {}


def _traces(model, schedule: str) -> list:  # noqa: ANN001
    if schedule not in _TRACES:
        _TRACES[schedule] = [run_rank(model, rank=r, pp=PP, num_microbatches=N_MB, micro_batch=B,
                                      pp_schedule=schedule) for r in range(PP)]
    return _TRACES[schedule]


@pytest.fixture(scope="module")
def one_f_one_b(model):  # noqa: ANN001, ANN201
    return _traces(model, "1f1b")


def _order(schedule: str, rank: int) -> list[tuple[str, int, int]]:
    """(action, stage, micro-batch) of `rank`, in the schedule's own order."""
    if schedule == "gpipe":  # ScheduleGPipe: every forward, then every backward
        return [("F", rank, i) for i in range(N_MB)] + [("B", rank, i) for i in range(N_MB)]
    if schedule == "1f1b":  # Schedule1F1B: p - i warm-up forwards, then 1B1F, then cool-down
        warm = min(N_MB, PP - rank)
        order = [("F", rank, i) for i in range(warm)]
        for i in range(N_MB):
            order.append(("B", rank, i))
            if warm + i < N_MB:
                order.append(("F", rank, warm + i))
        return order
    from torch.distributed.pipelining.schedules import (ScheduleInterleaved1F1B,
                                                        ScheduleInterleavedZeroBubble)

    class _Stage:  # the multi-stage orders depend only on stage count and group size
        def __init__(self, i: int) -> None:
            self.stage_index, self.group_size, self.group_rank = i, PP, rank
            self.num_stages = _stages(schedule)
            self.is_first, self.is_last = i == 0, i == self.num_stages - 1
            self.has_backward = True
            self.submod = None

    cls = ScheduleInterleaved1F1B if schedule == "interleaved_1f1b" else ScheduleInterleavedZeroBubble
    order = cls([_Stage(rank), _Stage(rank + PP)], N_MB).pipeline_order[rank]
    return [(a.computation_type.value, a.stage_index, a.microbatch_index)
            for a in order if a is not None]


def _replayed_activation_peak(schedule: str, rank: int) -> int:
    """Peak saved bytes over the rank's actions, every term named above."""
    n = _stages(schedule)
    layers = LAYERS // n
    per_mb = {s: layers * PER_LAYER + ROPE - (2 * B * S * H if s > 0 else 0)
              + (HEAD if s == n - 1 else 0) for s in range(n)}
    kept = {s: 0 if s == 0 else ZB_KEPT_LAST if s == n - 1 else ZB_KEPT_MIDDLE for s in range(n)}
    saved = peak = 0
    started: set[int] = set()
    for kind, s, _ in _order(schedule, rank):
        if kind == "F":
            if s not in started and s in (0, n - 1):
                saved += BATCH_IDS  # ids on the first stage, targets on the last
            started.add(s)
            saved += per_mb[s] + (RECV if s > 0 else 0)  # the receive buffer stays for the step
            peak = max(peak, saved)  # only forwards add: the peak is at the end of one
        elif kind == "B":
            saved -= per_mb[s]
        elif kind == "I":
            saved -= 4 if s == n - 1 else 0
        elif kind == "W":
            saved -= per_mb[s] - kept[s] - (4 if s == n - 1 else 0)
    return peak


def test_single_stage_execution_gives_the_named_per_microbatch_terms():
    # Second path for the terms the replay uses: one stage holding everything (pp=1), one
    # micro-batch: ids and targets [b, s] int64, one block, RoPE tables and the head terms.
    one = run_rank(spec("llama3-debug", n_layers=1, seq_len=S), micro_batch=B)
    two = run_rank(spec("llama3-debug", n_layers=2, seq_len=S), micro_batch=B)
    assert two.activation_bytes - one.activation_bytes == PER_LAYER
    assert one.activation_bytes == 2 * 8 * B * S + PER_LAYER + ROPE + HEAD


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_stage_holds_the_replayed_schedules_activations(model, schedule):
    traces = _traces(model, schedule)
    for rank, tr in enumerate(traces):
        # the rank ran the schedule's own actions, in that order (its kernel-stream marks)
        marks = [tuple(lbl.split()[1:]) for lbl in tr.kernels.column("label").to_pylist()
                 if lbl.startswith("begin ")]
        assert [(k, int(s), int(c)) for k, s, c in marks] == _order(schedule, rank), rank
        assert tr.activation_bytes == _replayed_activation_peak(schedule, rank), (schedule, rank)
    if schedule == "1f1b":  # the textbook statement: stage i holds p - i micro-batches
        per_mid = 2 * PER_LAYER - 2 * B * S * H + ROPE
        assert traces[1].activation_bytes == (PP - 1) * per_mid + N_MB * RECV
        assert traces[0].activation_bytes == PP * (2 * PER_LAYER + ROPE) + BATCH_IDS
        assert traces[PP - 1].activation_bytes == (per_mid + HEAD + N_MB * RECV + BATCH_IDS)
    if schedule == "gpipe":
        assert traces[0].activation_bytes == N_MB * (2 * PER_LAYER + ROPE) + BATCH_IDS


def test_interleaved_peak_is_narayanans_factor():
    # Narayanan et al.: the first rank of interleaved 1F1B holds the activations of
    # p (1 + (p-1)/(p v)) = 5.5 micro-batches of a whole rank's layers (p=4, v=2). A rank's
    # layers are v = 2 stages here, so at the peak 11 stage forwards are in flight.
    inflight = peak = 0
    for kind, _, _ in _order("interleaved_1f1b", 0):
        inflight += 1 if kind == "F" else -1
        peak = max(peak, inflight)
    assert peak == PP * (1 + (PP - 1) / (PP * 2)) * 2


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
