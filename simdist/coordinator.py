"""Async orchestration of one simulation: resolve the plan, group ranks into exact classes, run
one representative per class on Ray actors (every rank with `exhaustive`), stream progress, merge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from functools import partial
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

import simdist
from simdist.cache.store import resolve_dir
from simdist.config import ConfigError, SimdistConfig, require_trusted_code, trusting
from simdist.costmodel import UnknownGPU, gpu_spec
from simdist.models import ModelError, ModelSpec, build_model, count_params, entrypoint_spec, resolve_model
from simdist.mode.trace import RankTask, RankTrace
from simdist.parallel.classes import rank_classes
from simdist.parallel.mesh import MeshLayout
from simdist.parallel.validate import check_plan
from simdist.parallel.pipeline import stage_parts
from simdist.plan import ClusterPlan, merge

# A run with nothing to execute (every class rebuilt from the layer store) builds in the driver,
# one class after another (threads share the GIL), instead of starting actors: a build takes
# 0.2-0.8 s here (Llama 3 70B, 80 layers; 8 micro-batches of 1F1B), starting actors 3-4 s.
DRIVER_BUILDS_MAX = 8

# Reserved per GPU outside the PyTorch allocator: CUDA context, cuBLAS/NCCL workspaces.
# (PyTorch's caching allocator and NCCL reserve ~1 GiB together on H100 in torchtitan runs.)
RESERVED_BYTES = 1 << 30


def resolve_spec(cfg: SimdistConfig) -> ModelSpec:
    m = cfg.model
    require_trusted_code(cfg)  # before anything of the entrypoint is imported
    try:
        if m.entrypoint:
            return entrypoint_spec(m.entrypoint, m.kwargs)
        if m.hf:
            raise ModelError("model.hf", "Hugging Face models need the `transformers` package, "
                                         "which this installation lacks; allowed: preset, entrypoint")
        return resolve_model(m.preset, m.overrides(), seq_len=cfg.training.seq_len,
                             routing=cfg.training.routing,
                             attention=cfg.training.attention)
    except ModelError as e:
        raise ConfigError(e.key, str(e)) from None


def prepare(cfg: SimdistConfig) -> tuple[ModelSpec, MeshLayout, list[list[int]], Any]:
    """Everything that can be decided without simulating; raises ConfigError on bad input."""
    spec = resolve_spec(cfg)
    check_plan(cfg, spec)
    try:
        gpu = gpu_spec(cfg.cluster.gpu if isinstance(cfg.cluster.gpu, str)
                       else cfg.cluster.gpu.model_dump())
    except UnknownGPU as e:
        raise ConfigError("cluster.gpu", str(e)) from None
    p = cfg.parallel
    layout = MeshLayout.from_parallel(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp, p.ep)
    dim0_by_stage = []
    for pp_rank in range(p.pp):  # each pipeline rank's own parameters
        parts = stage_parts(partial(build_model, spec, "meta"), spec.n_layers or 0, p.pp,
                            pp_rank, p.pp_schedule, p.pp_virtual_stages, p.pp_layers)
        dim0 = [prm.shape[0] for _, m in parts for prm in m.parameters() if prm.dim() > 0]
        if p.tp > 1:
            # FSDP shards the tensor-parallel shard: dims split by TP appear at dim0 / tp.
            # Adding both sizes can only split classes further, never merge ranks that differ.
            dim0 += [d // p.tp for d in dim0 if d % p.tp == 0]
        dim0_by_stage.append(dim0)
    ep_loads = expert_loads(spec, cfg, layout)
    # experts' local dim 0 under EP: their own FSDP unit over dp_shard_mod_ep
    expert_dim0 = [spec.args.n_experts // p.ep] if p.ep > 1 else []
    classes = list(rank_classes(layout, dim0_by_stage, ep_loads, expert_dim0).values())
    return spec, layout, classes, gpu


def expert_loads(spec: ModelSpec, cfg: SimdistConfig, layout: MeshLayout) -> list[tuple] | None:
    """Tokens each EP rank's experts receive, per MoE layer: what makes EP ranks differ."""
    if layout.ep == 1:
        return None
    from simdist.parallel.expert_parallel import ep_received_counts

    n_tokens = cfg.training.micro_batch * cfg.training.seq_len // (
        cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    try:
        return [tuple(map(tuple, ep_received_counts(spec.args, spec.args.routing, n_tokens,
                                                    layout.ep, r)))
                for r in range(layout.ep)]
    except (ValueError, OSError) as e:
        raise ConfigError("training.routing", str(e)) from None


def _task(cfg: SimdistConfig, spec: ModelSpec, layout: MeshLayout, rank: int,
          use_cache: bool = True) -> RankTask:
    t = cfg.training
    return RankTask(rank=rank, layout=layout, model=spec, seq_len=t.seq_len,
                    micro_batch=t.micro_batch, num_microbatches=cfg.num_microbatches,
                    dtype=t.dtype, optimizer=t.optimizer,
                    activation_checkpointing=t.activation_checkpointing,
                    sequence_parallel=cfg.parallel.sequence_parallel,
                    pp_schedule=cfg.parallel.pp_schedule,
                    pp_virtual_stages=cfg.parallel.pp_virtual_stages,
                    pp_layers=tuple(cfg.parallel.pp_layers) if cfg.parallel.pp_layers else None,
                    zero_stage=cfg.parallel.zero_stage,
                    layer_memo=use_cache and cfg.simulation.layer_memo,
                    layer_cache_dir=(str(resolve_dir(cfg.simulation.cache_dir))
                                     if use_cache else None))


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):  # noqa: ANN201
    """Join `address` (or RAY_ADDRESS), or start a local Ray; stop only what we started."""
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    from simdist.workers.connect import address_key, bounded_join, keep_signal_handlers, probe

    key = address_key(address)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  logging_level="ERROR", configure_logging=False)
    if address:
        probe(address, key)  # bounded: ray.init would retry for minutes where nothing answers
        with keep_signal_handlers():
            try:
                with bounded_join():
                    ray.init(address=address, **kwargs)
            except Exception as e:  # noqa: BLE001 - reachable, but not a cluster we can join
                from simdist.errors import one_line

                raise ConfigError(key, f"cannot join the Ray cluster at {address}: "
                                       f"{one_line(e)}") from None
    else:
        # Ray notes at every local start that token authentication is on (its default, kept);
        # batch jobs read our stderr for errors, so that notice stays out of it.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        # address="local": always a new local Ray, never a cluster some `ray start` left behind
        with keep_signal_handlers():
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
    try:
        yield ray.get_runtime_context().gcs_address if address else None
    finally:
        ray.shutdown()


class Progress:
    """rich progress on a terminal, silent otherwise (batch jobs, CI)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(transient=True)
            self._task = self._bar.add_task("simulating rank classes", total=total)
            self._bar.start()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def _run_tasks(tasks: list[RankTask], n_workers: int | str, timeout_s: float,
                     progress: bool, start_cache: Callable[[str | None], Any] | None = None,
                     ) -> tuple[list[RankTrace], set[str], int, Any]:
    """Simulate every task (one per rank class) on a pool of actors. A layer-memo rank is three
    short executions and a build, each its own call (so one rank's steps run side by side), and
    its model goes to / comes from the layer store here, on the driver's node. When every rank
    is rebuilt from the store nothing executes: up to DRIVER_BUILDS_MAX ranks are then built in
    the driver, with no actor and no cache-service process started."""
    from simdist.mode.rank import open_memo
    from simdist.workers.pool import ActorPool, pool_size, start_workers

    jobs = [open_memo(t) for t in tasks]
    executions = sum(_executions(j) for j in jobs)
    in_driver = executions == 0 and len(jobs) <= DRIVER_BUILDS_MAX
    actors = [] if in_driver else start_workers(pool_size(n_workers, max(executions, len(jobs))))
    # --- shared dispatch cache (simdist/cache): its service starts after the rank actors were
    # requested, so it does not take their start-up slots; nothing waits for it here. With
    # nothing to execute it lives in the driver: no process to start for a summary ---
    run_cache = (start_cache("driver" if in_driver else None) if start_cache is not None
                 else None)
    # --- end shared dispatch cache ---
    pool = ActorPool(actors, timeout_s, run_cache)
    bar = Progress(len(tasks), progress)

    async def one(task: RankTask, job: Any) -> RankTrace:
        trace = await _simulate(pool, task, job)
        bar.advance()
        return trace

    try:
        traces = await asyncio.gather(*(one(t, j) for t, j in zip(tasks, jobs)))
    finally:
        bar.close()
        await pool.close()
    return list(traces), pool.nodes, len(actors), run_cache


def _executions(job: Any) -> int:
    """Executions a rank needs: in full (no memo, or the memo known not to fit), the memo's
    short steps, or none (its model is stored)."""
    if job is None or job.fallback:
        return 1
    return len(job.short_tasks())


async def _simulate(pool: Any, task: RankTask, job: Any) -> RankTrace:
    """One rank: executed in full, or through its memo job (simdist.mode.rank.MemoJob)."""
    from simdist.mode.rank import store_memo

    if job is None:
        return await pool.execute(task)
    units = list(await asyncio.gather(*(pool.execute(t, keep_streams=True)
                                        for t in job.short_tasks())))
    trace, parts, build_s = (None, None, 0.0) if job.fallback else await pool.build(
        job, [u.streams for u in units])
    store_memo(job, parts)
    if trace is None:  # the short steps do not fit the memo's model: execute in full
        units.append(await pool.execute(task))
    return job.account(trace, units, build_s)


async def simulate_async(cfg: SimdistConfig, *, address: str | None = None,
                         workers: int | str | None = None, exhaustive: bool = False,
                         progress: bool = False, use_cache: bool = True,
                         trust_code: bool = False) -> ClusterPlan:
    """`use_cache=False` (--no-cache): neither read nor write the shared dispatch cache.
    `trust_code=True`: allow `model.entrypoint` (it imports and runs the code it names)."""
    t0 = time.perf_counter()
    from simdist.cache.session import unusable_cache_dir
    from simdist.config import check_workers

    cfg = trusting(cfg, trust_code)
    if workers is not None:
        workers = check_workers(workers, "workers")
    cache_warnings = []
    if use_cache and (problem := unusable_cache_dir(cfg.simulation.cache_dir)):
        cache_warnings.append(problem)  # one warning, and the run goes on without the cache
        import warnings

        from simdist.cache.store import CacheWarning

        warnings.warn(problem, CacheWarning, stacklevel=2)
        use_cache = False
    spec, layout, classes, gpu = prepare(cfg)
    reps = [ranks[0] for ranks in classes]
    if exhaustive:
        classes = [[r] for r in range(layout.world_size)]
        reps = list(range(layout.world_size))
    tasks = [_task(cfg, spec, layout, r, use_cache) for r in reps]
    with ray_session(address) as ray_address:
        import ray

        # --- shared dispatch cache (simdist/cache) ---
        from simdist.cache.session import RunCache, disabled_summary, layer_summary

        start_cache = (partial(RunCache.start, cfg.simulation.cache_dir, gpu) if use_cache
                       else None)  # called with the service's placement
        # --- end shared dispatch cache ---
        traces, nodes, n_actors, run_cache = await _run_tasks(
            tasks, workers or cfg.simulation.workers, cfg.simulation.rank_timeout_s, progress,
            start_cache)
        # --- shared dispatch cache: write back, fill plan.json `cache` ---
        cache = await run_cache.finish(traces) if run_cache is not None else disabled_summary(traces)
        cache["layer"] = layer_summary(traces, cfg.simulation.cache_dir if use_cache else None)
        if cache_warnings:
            cache["warnings"] = [*cache.get("warnings", []), *cache_warnings]
        # --- end shared dispatch cache ---
        cluster_nodes = len([n for n in ray.nodes() if n.get("Alive")])
    if exhaustive:
        classes, traces = _regroup(traces)
    t = cfg.training
    summary = dict(
        num_params=count_params(build_model(spec, "meta")),
        config=cfg.to_dict(),
        simdist_version=simdist.__version__,
        torch_version=torch.__version__,
        gpu=gpu.name,
        cache=cache,
        execution=dict(ray_address=ray_address, nodes=len(nodes), cluster_nodes=cluster_nodes,
                       actors=n_actors, exhaustive=exhaustive),
    )
    plan = merge(
        layout=layout, classes=classes, traces=traces, gpu=gpu,
        gpus_per_node=cfg.cluster.gpus_per_node, dtype=t.dtype, summary=summary,
        tokens_per_step=t.global_batch * t.seq_len,
        memory_limit_bytes=gpu.hbm_bytes - RESERVED_BYTES,
        pp_schedule=cfg.parallel.pp_schedule,
        pp_virtual_stages=cfg.parallel.pp_virtual_stages,
        num_microbatches=cfg.num_microbatches,
    )
    plan.summary["sim_wall_s"] = time.perf_counter() - t0
    return plan


def _regroup(traces: list[RankTrace]) -> tuple[list[list[int]], list[RankTrace]]:
    """Exhaustive runs: every rank is its own class; keep rank order."""
    traces = sorted(traces, key=lambda tr: tr.rank)
    return [[tr.rank] for tr in traces], traces


def simulate(cfg: SimdistConfig, **kwargs: Any) -> ClusterPlan:
    """Simulate one plan; see `simulate_async` for the options."""
    return asyncio.run(simulate_async(cfg, **kwargs))
