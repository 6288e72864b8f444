"""GPT tensor (+ sequence) parallelism against Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), Table 2: saved-activation bytes per layer, measured as
the activation_bytes difference between 2-layer and 1-layer runs of the eager GPT; and the GPT TP
collectives per layer against the module structure.

Per-layer saved bytes of one GPT block, 16-bit activations, 1-byte dropout masks, from the code
(s seq, b micro-batch, h hidden, a heads, t TP degree):

  attention  LN1 input 2sbh; qkv input (LN1 output) 2sbh; Q, K, V (views of one qkv output,
             saved by baddbmm and bmm) 6sbh; softmax output 2as^2b, dropout mask as^2b, dropout
             output 2as^2b; proj input (context copied to [s, b, h]) 2sbh; dropout mask sbh
  MLP        LN2 input 2sbh; fc1 input (LN2 output) 2sbh; fc1 output (gelu input) 8sbh; gelu
             output (fc2 input) 8sbh; dropout mask sbh
  together   34sbh + 5as^2b = sbh(34 + 5as/h), the paper's eq. 1

  plus what the paper neglects: LayerNorm mean and rstd, [s, b, 1] each in fp32 (the CUDA
  kernel's accumulate type; simdist/mode/cuda.py), two LayerNorms: 16sb (replicated without SP,
  16sb/t on sequence shards with SP).

- TP: colwise qkv/fc1 and rowwise proj/fc2 shard everything between them by heads or MLP width:
  Q, K, V 6, proj input 2, fc1 output 8, gelu output 8 -> 24sbh/t, and 5as^2b/t. The rest, 10sbh
  (LN1 in 2, qkv in 2, mask 1, LN2 in 2, fc1 in 2, mask 1), is replicated. Exact: + 16sb.
- TP + SP: the LayerNorms, dropouts and residual adds run on [s/t, b, h] sequence shards, so the
  10sbh become 10sbh/t, the inputs of qkv and fc1 included: like Megatron (paper, section
  4.2.3) the GPT plan keeps only the rank's 2sbh/t shard of those and all-gathers it again in
  backward (simdist.parallel.checkpointing.regather_in_backward: selective checkpointing that
  recomputes only the all-gather). Plain DTensor TP + SP (the llama3 plan, torchtitan's) would
  keep the gathered [s, b, h] input, +4sbh(1 - 1/t). Exact: (sbh/t)(34 + 5as/h) + 16sb/t.
- selective recompute (the attention core, Korthikanti): the 5as^2b term goes, the rest stays.
- full recompute: only the block input, 2sbh; with SP the block input is the rank's sequence
  shard, 2sbh/t.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
from conftest import collective_counts, run_rank, spec

from simdist.families import build_model, count_params

B, S, H, A = 2, 256, 256, 8  # gpt-debug (dim 256, 8 heads: divisible by t = 2, 4, 8), seq 256
SBH, SB = S * B * H, S * B
TS = (2, 4, 8)


@functools.lru_cache(maxsize=None)
def _runs(t: int, sp: bool, ac: str):  # noqa: ANN202
    """(1-layer trace, 2-layer trace) of the eager GPT on TP rank 0."""
    return tuple(run_rank(spec("gpt-debug", attention="eager", n_layers=n), tp=t, micro_batch=B,
                          sequence_parallel=sp, activation_checkpointing=ac) for n in (1, 2))


def per_layer_saved(t: int, sp: bool, ac: str) -> int:
    one, two = _runs(t, sp, ac)
    return two.activation_bytes - one.activation_bytes


# row -> (sp, ac, Table 2 formula, exact bytes of the code: formula + the residual derived above)
ROWS = {
    "no parallelism": (False, "none", lambda t: SBH * (34 + 5 * A * S / H), lambda t: 16 * SB),
    "TP": (False, "none", lambda t: SBH * (10 + 24 / t + 5 * A * S / (H * t)), lambda t: 16 * SB),
    "TP + selective": (False, "selective", lambda t: SBH * (10 + 24 / t), lambda t: 16 * SB),
    "TP + SP": (True, "none", lambda t: SBH / t * (34 + 5 * A * S / H), lambda t: 16 * SB / t),
    "TP + SP + selective": (True, "selective", lambda t: 34 * SBH / t, lambda t: 16 * SB / t),
    "full recompute": (False, "full", lambda t: 2 * SBH, lambda t: 0),
    "full recompute + SP": (True, "full", lambda t: 2 * SBH / t, lambda t: 0),
}
# full recompute keeps only the block input: two t suffice there (the runs are the cost)
CASES = [("no parallelism", 1)] + [(row, t) for row in ROWS if row != "no parallelism"
                                   for t in (TS if "full" not in row else (2, 8))]


@pytest.mark.parametrize("row,t", CASES)
def test_saved_activations_per_layer_are_exact(row, t):
    sp, ac, formula, residual = ROWS[row]
    assert per_layer_saved(t, sp, ac) == formula(t) + residual(t)


@pytest.mark.parametrize("row,t", CASES)
def test_saved_activations_per_layer_within_5_percent_of_table_2(row, t):
    sp, ac, formula, _ = ROWS[row]
    assert per_layer_saved(t, sp, ac) == pytest.approx(formula(t), rel=0.05)


def _tp_collectives(tr) -> Counter:  # noqa: ANN001
    return collective_counts(tr, "tp")


ACT = SBH * 2  # one bf16 [s, b, h] activation
LOSS = SB * 4  # loss_parallel: one fp32 value per token


def test_tp_collectives_per_layer_without_sp():
    one, two = (_tp_collectives(tr) for tr in _runs(4, False, "none"))
    # per layer: forward all-reduces the partial outputs of the rowwise proj and fc2; backward
    # all-reduces the input gradients of the colwise qkv and fc1. Nothing else.
    assert two - one == Counter({("fwd", "all_reduce", ACT): 2, ("bwd", "all_reduce", ACT): 2})
    assert one - two == Counter()
    # the rest: the rowwise embedding's output (forward), the colwise head's input gradient
    # (backward), loss_parallel's max, sum-exp and target logit over the vocab shards.
    assert two == Counter({("fwd", "all_reduce", ACT): 2 * 2 + 1,
                           ("bwd", "all_reduce", ACT): 2 * 2 + 1,
                           ("fwd", "all_reduce", LOSS): 3})


def test_tp_collectives_per_layer_with_sp():
    one, two = (_tp_collectives(tr) for tr in _runs(4, True, "none"))
    ln_param = H * 2  # a bf16 LayerNorm weight or bias
    # per layer: all-gather before qkv and fc1, reduce-scatter after proj and fc2; backward
    # mirrors them (reduce-scatter of the gathered inputs' gradients, all-gather of the
    # scattered outputs' gradients) and, as Megatron does, all-gathers the qkv and fc1 inputs
    # again instead of keeping them: 4 backward all-gathers. The replicated LayerNorm weights
    # and biases see sequence shards, so their four gradients are all-reduced.
    assert two - one == Counter({
        ("fwd", "all_gather", ACT): 2, ("fwd", "reduce_scatter", ACT): 2,
        ("bwd", "all_gather", ACT): 4, ("bwd", "reduce_scatter", ACT): 2,
        ("bwd", "all_reduce", ln_param): 4})
    assert one - two == Counter()
    # the rest: the embedding's reduce-scatter and the head's all-gather (and their backward),
    # the final norm's two gradients, the position table's gradient (its lookup runs on
    # sequence shards), loss_parallel.
    assert two == Counter({
        ("fwd", "all_gather", ACT): 2 * 2 + 1, ("fwd", "reduce_scatter", ACT): 2 * 2 + 1,
        ("bwd", "all_gather", ACT): 2 * 4 + 1, ("bwd", "reduce_scatter", ACT): 2 * 2 + 1,
        ("bwd", "all_reduce", ln_param): 4 * 2 + 2, ("bwd", "all_reduce", S * H * 2): 1,
        ("fwd", "all_reduce", LOSS): 3})


@pytest.mark.parametrize("sp", [False, True])
def test_tp_shards_gpt_parameters_and_flops_exactly_and_keeps_the_tie(sp):
    model = spec("gpt-debug", attention="eager", n_layers=2)
    a, L = model.args, 2
    n = count_params(build_model(model))  # tied: the [V, h] embedding/head weight counts once
    # replicated over tp: LayerNorm weights and biases, the rowwise proj/fc2 biases, positions
    replicated = (4 * L + 2) * a.dim + 2 * L * a.dim + a.max_seq_len * a.dim
    tp1, tp4 = _runs(1, False, "none")[1], _runs(4, sp, "none")[1]
    assert tp1.param_bytes == 4 * n
    # one vocab-sharded [V/4, h] weight serves both the embedding and the head (untied it
    # would add another 4 * V * h / 4 bytes)
    assert tp4.param_bytes == 4 * ((n - replicated) // 4 + replicated)
    assert tp4.flops * 4 == tp1.flops
    assert tp4.model_flops * 4 == tp1.model_flops


def test_later_pipeline_stage_with_sp_reads_the_full_sequence():
    # pp=2 x tp=2, rank 3: the last stage, second TP rank. Its input is the [s/2, b, h] sequence
    # shard; the causal mask must still be s x s (the attention core runs on the whole sequence).
    tr = run_rank(spec("gpt-debug", attention="eager", n_layers=2), tp=2, pp=2, rank=3,
                  micro_batch=B, num_microbatches=2, sequence_parallel=True)
    c = _tp_collectives(tr)
    # one layer on this stage, two micro-batches: per layer all-gather before qkv and fc1,
    # reduce-scatter after proj and fc2 (backward mirrors them and re-gathers the qkv and fc1
    # inputs); the head gathers its input (and reduce-scatters its gradient) once more; without
    # loss_parallel (pipelining) it all-gathers the vocab-sharded logits, bf16 [s, b, V].
    assert c[("fwd", "all_gather", ACT)] == c[("bwd", "reduce_scatter", ACT)] == 2 * (2 + 1)
    assert c[("fwd", "reduce_scatter", ACT)] == 2 * 2
    assert c[("bwd", "all_gather", ACT)] == 2 * (2 + 2)
    assert c[("fwd", "all_gather", S * B * 2048 * 2)] == 2
