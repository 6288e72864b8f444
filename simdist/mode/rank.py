"""Simulate one rank: build the model on meta, parallelise it with torch.distributed, materialise
it as fake tensors, run one recorded training step."""

from __future__ import annotations

import time

from torch._subclasses.fake_tensor import FakeTensorMode

from simdist.config import torch_dtype
from simdist.models import build_model
from simdist.mode.context import StepContext
from simdist.mode.session import rank_session
from simdist.mode.step import init_optimizer_state, make_optimizer, run_step
from simdist.mode.trace import RankTask, RankTrace
from simdist.parallel import ParallelPlan, build_device_mesh, mesh_group_dims, parallelize


def _cache_counts() -> dict[str, int]:
    info = FakeTensorMode.cache_info()
    return {"hits": info.hits, "misses": info.misses, "bypasses": sum(info.bypasses.values()),
            "size": info.size}


def simulate_rank(task: RankTask) -> RankTrace:
    t0 = time.perf_counter()
    cache0 = _cache_counts()
    ctx = StepContext()
    with rank_session(task.rank, task.layout.world_size, ctx):
        mesh = build_device_mesh(task.layout)
        plan = ParallelPlan(task.layout, torch_dtype(task.dtype), task.activation_checkpointing,
                            task.sequence_parallel)
        model = build_model(task.model, "meta")
        parallelize(task.model.family, model, mesh, plan)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model.to_empty(device="cpu")
        fake_mode.allow_non_fake_inputs = False
        with fake_mode, ctx.exclude():
            optimizer = make_optimizer(model, task.optimizer)
            init_optimizer_state(model, optimizer)
        fields = run_step(
            model, optimizer, fake_mode, ctx,
            group_dims=mesh_group_dims(mesh),
            vocab_size=_vocab(task), batch=task.micro_batch, seq_len=task.seq_len,
            num_microbatches=task.num_microbatches, all_microbatches=task.all_microbatches,
            loss_parallel=plan.loss_parallel,
        )
    cache1 = _cache_counts()
    fields["wall_s"] = time.perf_counter() - t0
    fake_cache = {k: cache1[k] - cache0[k] for k in ("hits", "misses", "bypasses")}
    fake_cache["size"] = cache1["size"]
    return RankTrace(rank=task.rank, fake_cache=fake_cache, **fields)


def _vocab(task: RankTask) -> int:
    args = task.model.args
    return getattr(args, "vocab_size", None) or task.model.kwargs.get("vocab_size", 32000)
