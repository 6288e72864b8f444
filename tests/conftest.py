from __future__ import annotations

import os
import tempfile
from collections import Counter

import pytest

# Tests never touch the user's cache: one fresh cache directory per test session (the CLI tests'
# subprocesses inherit it). Always fresh, never inherited: a SIMDIST_CACHE_DIR from the user's
# shell would let warm entries of earlier runs change what the tests measure.
os.environ["SIMDIST_CACHE_DIR"] = tempfile.mkdtemp(prefix="simdist-test-cache-")

from simdist.config import ParallelConfig, TrainingConfig
from simdist.families import ModelSpec, resolve_model
from simdist.layout import MeshLayout
from simdist.memo import simulate_rank
from simdist.trace import RankTask, RankTrace

_TASK_FIELDS = ("all_microbatches", "layer_memo", "layer_cache_dir", "pipeline_memo",
               "stage_sharing")


def spec(preset: str, seq_len: int = 256, attention: str = "flash", routing: str = "balanced",
         **overrides) -> ModelSpec:
    """A model spec as the planner resolves it (`routing` is training.routing: MoE token counts
    live in the model spec, see planner.model_spec)."""
    return resolve_model(preset, overrides, seq_len=seq_len, attention=attention, routing=routing)


def make_task(model: ModelSpec, *, rank: int = 0, num_microbatches: int = 1, **kw) -> RankTask:
    """A RankTask from flat keywords: each goes to its config section (training.*,
    parallel.*) or to the task itself."""
    task_kw = {k: kw.pop(k) for k in _TASK_FIELDS if k in kw}
    training = {k: kw.pop(k) for k in list(kw) if k in TrainingConfig.model_fields}
    # The rank path reads the routing from the model spec (as the planner resolves it): a
    # training.routing the spec does not carry would be silently ignored.
    model_routing = getattr(model.args, "routing", "balanced")
    if training.setdefault("routing", model_routing) != model_routing:
        raise ValueError(f"routing={training['routing']!r}: pass it to spec(), the model has "
                         f"{model_routing!r}")
    par = ParallelConfig(**{"dp_shard": 1, **kw})  # the rest: parallel.* (unknown keys raise)
    layout = MeshLayout.from_parallel(par.pp, par.dp_replicate, par.dp_shard, par.cp, par.tp,
                                      par.ep)
    return RankTask(rank=rank, layout=layout, model=model, training=TrainingConfig(**training),
                    parallel=par, num_microbatches=num_microbatches, **task_kw)


def run_rank(model: ModelSpec, *, seq_len: int = 256, **kw) -> RankTrace:
    return simulate_rank(make_task(model, seq_len=seq_len, **kw))


@pytest.fixture(scope="session")
def llama8b() -> ModelSpec:
    return spec("llama3-8b", seq_len=512)


def collective_counts(tr: RankTrace, mesh_dim: str) -> Counter:
    """(phase, kind, bytes) -> count of the collectives on one mesh dimension."""
    c: Counter = Counter()
    for r in tr.collectives.to_pylist():
        if r["mesh_dim"] == mesh_dim:
            c[(r["phase"], r["kind"], r["bytes"])] += r["count"]
    return c


def simulate_here(config: dict):  # noqa: ANN201 - simdist.plan.ClusterPlan
    """A whole plan in this process, without Ray: the planner's tasks through the memo protocol
    on a local pool, merged as `simdist run` merges them."""
    from simdist.config import load_config
    from simdist.planner import plan_run

    return simulate_planned_here(plan_run(load_config(config), use_cache=False))


def simulate_planned_here(run):  # noqa: ANN001, ANN201 - RunPlan -> ClusterPlan
    """simulate_here for a RunPlan, with the summary keys the coordinator adds that a run
    directory needs (config, gpu, versions)."""
    import simdist
    from simdist.calibrate import calibration_for
    from simdist.families import flops_per_token
    from simdist.plan import merge

    cfg = run.cfg
    traces = [simulate_rank(t) for t in run.tasks]
    summary = {"flops_per_token": flops_per_token(run.spec, cfg.training.seq_len),
               "config": cfg.to_dict(), "gpu": run.gpu.name,
               "simdist_version": simdist.__version__, "sim_wall_s": 0.0}
    return merge(run, traces, summary, calibration_for(cfg))


@pytest.fixture(scope="session")
def report_dirs(tmp_path_factory):  # noqa: ANN201 - simdist.report tests: kind -> path
    """One directory of each kind a report is built from, simulated in this process (no Ray:
    sweep and search run their own code with the coordinator's simulation replaced by
    simulate_planned_here): `run` (llama3-debug, dp_shard 2 x tp 2 x pp 2: two rank classes,
    a pipeline bubble), `sweep` (GPUs 2, 4 x micro-batch 1, 4, 3 on a GPU with 70 MiB usable:
    micro-batch 4 does not fit, 3 does not divide the batch and is skipped), `search`
    (llama3-debug on 2 or 4 GPUs, the prior's best 3 plans simulated) and `compare` (an HTML file comparing the
    run with two of the sweep's plans)."""
    import contextlib

    from simdist import coordinator
    from simdist.compare import compare, to_html, write_html
    from simdist.search import run_search
    from simdist.sweep import run_sweep

    root = tmp_path_factory.mktemp("report")
    out: dict = {}
    run_cfg = {"model": {"preset": "llama3-debug"},
               "training": {"seq_len": 512, "micro_batch": 1, "global_batch": 8},
               "parallel": {"dp_shard": 2, "tp": 2, "pp": 2},
               "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 1,
                           "price_per_gpu_hour": 2.0}}
    out["run"] = simulate_here(run_cfg).write(root / "run")

    async def here(run, **_):  # noqa: ANN001, ANN003, ANN202 - coordinator.simulate_async
        import asyncio  # simulate_rank runs its own event loop: not inside this one

        return await asyncio.to_thread(simulate_planned_here, run)

    mp = pytest.MonkeyPatch()
    mp.setattr(coordinator, "simulate_async", here)
    mp.setattr(coordinator, "ray_session", lambda *a, **k: contextlib.nullcontext())
    try:
        # usable memory = hbm_gb x 1e9 - 1 GiB reserved = 70 MiB
        hbm_gb = (2**30 + 70 * 2**20) / 1e9
        base = {"model": {"preset": "llama3-debug"},
                "training": {"seq_len": 256, "micro_batch": 1, "global_batch": 16},
                "cluster": {"gpu": {"name": "small-h100", "bf16_tflops": 989, "hbm_gb": hbm_gb,
                                    "hbm_tb_s": 3.35, "nvlink_gb_s": 450},
                            "gpus_per_node": 2, "nodes": 1, "price_per_gpu_hour": 2.5}}
        out["sweep"] = run_sweep(base, ["cluster.gpus_per_node=2,4",
                                        "training.micro_batch=1,4,3"], [], root / "sweep",
                                 progress=False).out
        search_cfg = {"model": {"preset": "llama3-debug"},
                      "training": {"seq_len": 256, "micro_batch": 1, "global_batch": 8},
                      "cluster": {"gpu": "h100-sxm", "gpus_per_node": 4, "nodes": 1}}
        out["search"] = run_search(search_cfg, [], root / "search", gpus=[2, 4], max_plans=3,
                                   top=2, progress=False).out
    finally:
        mp.undo()
    cmp = compare([out["run"], out["sweep"] / "plans" / "0", out["sweep"] / "plans" / "4"])
    out["compare"] = write_html(root / "compare.html", to_html(cmp))
    return out

def llama3_saved_bytes(a, *, batch: int, seq_len: int, n_layers: int, tp: int = 1,  # noqa: ANN001
                       sequence_parallel: bool = False, cp: int = 1, cp_rank: int = 0) -> int:
    """Saved-activation bytes of one micro-batch of simdist's llama3 on one rank (bf16, CUDA
    kernels: simdist/models/kernels.py), derived tensor by tensor from the code, as
    tests/test_korthikanti.py derives GPT's. b micro-batch, s tokens on the rank (seq / cp),
    h dim, H heads, kv kv-heads, d head_dim, F ffn_dim, V vocab, t TP degree.

    Per layer:
      attention_norm, ffn_norm (fused RMSNorm saves input and fp32 rstd [b, s, 1]): 2 x
        (2bsh + 4bs), on the rank's s/t sequence shard with SP
      wq/wk/wv input (the norm output, shared) and w1/w3 input: 2 x 2bsh, the whole sequence
        also with SP: plain DTensor TP + SP (torchtitan's plan) keeps the all-gathered input
      flash attention saves q (2bs(H/t)d), k and v after repeat_kv, out (2bs(H/t)d; wo's input
        is a view: CUDA flash writes [b, s, heads, d]), lse (fp32 [b, H/t, s]) and the philox
        rng state (uint64 [2] + uint64 []: 24 B, not sharded). repeat_kv's reshape of the
        expand copies to H/t heads, except when the rank holds one kv head (kv/t = 1) or needs
        no repeat: then it is a view of the kv/t-head storage
      ring attention (cp > 1): torch's _SDPAMerger keeps the first step's flash layout, but a
        step that updates half the queries (step i > cp rank: every rank but the last) rebuilds
        the output by torch.cat, [b, heads, s, d] contiguous: wo's input is then a copy, +2bsh
      feed-forward: w1 out, silu out, w3 out, w2 input: 4 x 2bs(F/t)
    Once per step:
      token ids int64 8bs; RoPE cos and sin bf16 [max_seq_len, d] each, whole tables (the
      `cos[:s]` slice is a view; under CP too), saved by layer 0's rope and shared by all; final
      norm 2bsh + 4bs (s/t with SP); head input 2bsh; fp32 log-softmax 4bsV/t (loss_parallel
      keeps it vocab-sharded); nll_loss's int64 targets 8bs and fp32 total_weight 4.
    """
    b, s, h, d = batch, seq_len // cp, a.dim, a.head_dim
    s_norm = s // tp if sequence_parallel else s
    heads, kv_local = a.n_heads // tp, a.n_kv_heads // tp
    kv_heads = kv_local if kv_local == 1 or kv_local == heads else heads
    layer = (2 * (2 * b * s_norm * h + 4 * b * s_norm)  # the two norms
             + 2 * 2 * b * s * h  # attention and feed-forward inputs
             + 2 * b * s * heads * d * 2 + 2 * 2 * b * s * kv_heads * d  # q, out; k, v
             + 4 * b * heads * s + 24  # lse, rng state
             + (2 * b * s * h if cp_rank < cp - 1 else 0)  # ring attention: wo's input copied
             + 4 * 2 * b * s * a.ffn_dim // tp)
    once = (8 * b * s + 2 * 2 * a.max_seq_len * d + 2 * b * s_norm * h + 4 * b * s_norm
            + 2 * b * s * h + 4 * b * s * a.vocab_size // tp + 8 * b * s + 4)
    return n_layers * layer + once
