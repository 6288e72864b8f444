from __future__ import annotations

import os
import tempfile
from collections import Counter

import pytest

# Tests never touch the user's cache: one fresh cache directory per test session (the CLI tests'
# subprocesses inherit it).
os.environ.setdefault("SIMDIST_CACHE_DIR", tempfile.mkdtemp(prefix="simdist-test-cache-"))

from simdist.mode.rank import simulate_rank
from simdist.mode.trace import RankTask, RankTrace
from simdist.models import ModelSpec, resolve_model
from simdist.parallel.mesh import MeshLayout


def spec(preset: str, seq_len: int = 256, attention: str = "flash", **overrides) -> ModelSpec:
    return resolve_model(preset, overrides, seq_len=seq_len, attention=attention)


def run_rank(model: ModelSpec, *, rank: int = 0, dp_shard: int = 1, dp_replicate: int = 1,
             tp: int = 1, pp: int = 1, cp: int = 1, seq_len: int = 256, micro_batch: int = 1, num_microbatches: int = 1,
             **kw) -> RankTrace:
    layout = MeshLayout.from_parallel(pp, dp_replicate, dp_shard, cp, tp)
    return simulate_rank(RankTask(rank=rank, layout=layout, model=model, seq_len=seq_len,
                                  micro_batch=micro_batch, num_microbatches=num_microbatches, **kw))


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
