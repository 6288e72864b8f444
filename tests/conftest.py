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

_TASK_FIELDS = ("all_microbatches", "layer_memo", "layer_cache_dir", "pipeline_memo")


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
    from simdist.calibrate import calibration_for
    from simdist.config import load_config
    from simdist.families import flops_per_token
    from simdist.plan import merge
    from simdist.planner import plan_run

    cfg = load_config(config)
    run = plan_run(cfg, use_cache=False)
    traces = [simulate_rank(t) for t in run.tasks]
    summary = {"flops_per_token": flops_per_token(run.spec, cfg.training.seq_len)}
    return merge(run, traces, summary, calibration_for(cfg))
