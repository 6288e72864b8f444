"""Async orchestration of one simulation: the planner's tasks (one per rank class, every rank
with `exhaustive`) turned into traces on Ray actors, with progress, then merged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from functools import partial
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

import simdist
from simdist.calibrate import calibration_for
from simdist.config import ConfigError, SimdistConfig, check_workers, trusting
from simdist.memo import (LayeredPipelineJob, MemoJob, PipelineJob, open_memo,
                          planned_executions, share_sources, simulate_classes)
from simdist.plan import ClusterPlan, merge
from simdist.rebuilt import keep_rebuilt, stored_rank
from simdist.planner import RunPlan, plan_run
from simdist.trace import RankTask, RankTrace
from simdist.workers.cancel import cancel_and_wait

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


class SharedWorkers:
    """One Ray session and one set of rank actors for many plans (a sweep, a search): Ray starts
    when the first plan has something to execute (a sweep whose every plan is in the layer store
    starts none: its plans rebuild in the driver), actors start when a plan needs more than are
    running and stay warm for the next plan (an actor's start, importing torch, costs seconds;
    the actors keep no state of a plan but the dispatch cache they warmed, which the next plan
    shares anyway). Use inside the caller's event loop; `close` ends the actors, then Ray."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.ray_address: str | None = None
        self.actors: list = []
        self.started = 0  # actors started over the session (plan.json execution.actors_started)
        self._stack = ExitStack()
        self.ray_started = False

    def session(self) -> str | None:
        """The GCS address of a joined cluster (None for the local Ray), starting Ray once."""
        if not self.ray_started:
            self.ray_address = self._stack.enter_context(ray_session(self.address))
            self.ray_started = True
        return self.ray_address

    def take(self, n: int) -> list:
        """`n` actors: the warm ones, and new ones where there are fewer."""
        from simdist.workers.pool import start_workers

        if len(self.actors) < n:
            new = start_workers(n - len(self.actors))
            self.actors += new
            self.started += len(new)
        return self.actors[:n]

    def give_back(self, taken: list, now: list) -> None:
        """A plan's pool replaced the actors it timed out (ActorPool._replace): keep its new
        ones in their places."""
        swap = {id(a): b for a, b in zip(taken, now)}
        self.actors = [swap.get(id(a), a) for a in self.actors]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
        self._stack.close()


WATCH_INTERVAL_S = 1.0  # how often the Ray processes the run depends on are checked


async def watch_ray(ray_address: str | None) -> None:
    """Return never; raise RayClusterLost when a Ray process the run depends on dies: the GCS or
    raylet of the local Ray this run started (their exit codes), or the GCS of a joined cluster
    (it stops accepting connections). Without it a driver waiting on actor results learns of
    the death only from Ray's own timeouts (a minute for the GCS, then the C++ core ends the
    process; FIELD-NOTES measured a 13-minute hang)."""
    import ray

    from simdist.errors import RayClusterLost

    node = getattr(ray._private.worker, "_global_node", None)
    watched = []
    if ray_address is None and node is not None:
        for name in ("gcs_server", "raylet"):
            watched += [(name, info.process) for info in node.all_processes.get(name, [])]
    gcs = None if ray_address is None else ray.get_runtime_context().gcs_address
    misses = 0
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        for name, proc in watched:
            code = proc.poll()
            if code is not None:
                raise RayClusterLost(f"the local Ray's {name} (pid {proc.pid}) died during the "
                                     f"run (exit code {code})")
        if gcs:
            host, _, port = gcs.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
                writer.close()
                misses = 0
            except (OSError, asyncio.TimeoutError):
                misses += 1
                if misses >= 3:
                    raise RayClusterLost(f"the Ray cluster's GCS at {gcs} stopped accepting "
                                         "connections during the run") from None


async def watched(coro: Any, ray_address: str | None) -> Any:
    """`coro`'s result, unless a Ray process it depends on dies first (watch_ray): then the run
    is cancelled and RayClusterLost raised."""
    run = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(watch_ray(ray_address))
    try:
        done, _ = await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            watch.result()  # raises RayClusterLost
        return run.result()
    finally:
        await cancel_and_wait(watch)
        # Let the run finish its own cleanup (the pool kills its actors) before Ray is shut
        # down, also when this coroutine is cancelled (Ctrl-C, SIGTERM): cancelled once.
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


class Phases:
    """One line on stderr per phase of a run (starting Ray, executing, rebuilding, merging),
    also when stderr is not a terminal (batch jobs, CI logs); nothing when disabled (--quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console: Any = None  # the progress bar's console while one is shown

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        if self.console is not None:
            self.console.print(f"simdist: {text}", markup=False, highlight=False)
        else:
            print(f"simdist: {text}", file=sys.stderr, flush=True)


class Progress:
    """rich progress on a terminal, silent otherwise (batch jobs, CI: the phase lines say
    what happens there)."""

    def __init__(self, total: int, enabled: bool, phases: Phases | None = None) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(transient=True)
            self._task = self._bar.add_task("simulating rank classes", total=total)
            self._bar.start()
            if phases is not None:
                phases.console = self._bar.console
        self._phases = phases

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            if self._phases is not None:
                self._phases.console = None


def nothing_to_execute(tasks: list[RankTask],
                       jobs: list[MemoJob | PipelineJob | LayeredPipelineJob | None]) -> bool:
    """Every rank is rebuilt from the layer store (or from another rank that is): no
    execution, so no Ray and no actor."""
    return all(j is not None for j in jobs) and planned_executions(tasks, jobs) == 0


async def build_in_driver(tasks: list[RankTask],
                          jobs: list[MemoJob | PipelineJob | LayeredPipelineJob]
                          ) -> list[RankTrace]:
    """Every rank rebuilt from its stored model here, one after another, by the memo protocol on
    a pool that has nothing to execute (a build is pure Python on the stored events: threads
    would share the GIL, and starting processes costs more than the builds;
    benchmarks/README.md, scale_16k)."""
    from simdist.workers.local import LocalPool

    return await simulate_classes(LocalPool(), tasks, jobs)


async def _run_tasks(tasks: list[RankTask], n_workers: int | str, timeout_s: float,
                     progress: bool, start_cache: Callable[[str | None], Any] | None = None,
                     phases: Phases | None = None, jobs: list[MemoJob | None] | None = None,
                     shared: SharedWorkers | None = None,
                     ) -> tuple[list[RankTrace], set[str], int, Any]:
    """Simulate every task (one per rank class) on a pool of actors, each through the memo
    protocol (simdist/memo.py); memo models go to / come from the layer store here, on the
    driver's node (`jobs`: the tasks' memo jobs where the caller opened them already). A
    class with nothing to execute is built in the driver (no actor call); when no class has
    anything to execute `simulate_async` does not come here (build_in_driver, no Ray).
    `shared`: the actors come from (and stay with) a sweep's SharedWorkers."""
    from simdist.workers.pool import ActorPool, pool_size, start_workers

    jobs = jobs if jobs is not None else [open_memo(t) for t in tasks]
    sources = share_sources(tasks, jobs)
    n_exec = planned_executions(tasks, jobs, sources)
    in_driver = n_exec == 0
    if in_driver:
        actors = []
    elif shared is not None:
        actors = shared.take(pool_size(n_workers, n_exec))
    else:
        actors = start_workers(pool_size(n_workers, n_exec))
    taken = list(actors)
    # The shared dispatch cache's service starts after the rank actors were requested, so it
    # does not take their start-up slots; with nothing to execute it lives in the driver.
    run_cache = (start_cache("driver" if in_driver else None) if start_cache is not None
                 else None)
    pool = ActorPool(actors, timeout_s, run_cache, owned=shared is None)
    phases = phases or Phases(False)
    n_memo = sum(j is not None for j in jobs)
    where = "in the driver" if in_driver else f"on {len(actors)} actor(s)"
    phases(f"executing {len(tasks)} rank class(es): {n_exec} execution(s) {where}")
    if n_memo:
        phases(f"rebuilding {n_memo} class(es) from short runs through the layer / pipeline memo")
    if n_shared := sum(s is not None for s in sources):
        phases(f"rebuilding {n_shared} middle pipeline rank class(es) from another's units "
               "(simulation.stage_sharing)")
    bar = Progress(len(tasks), progress, phases)

    try:
        traces = await simulate_classes(pool, tasks, jobs, bar.advance, sources)
    except BaseException:
        if run_cache is not None:  # (`finish` ends it on success)
            run_cache.end()
        raise
    finally:
        bar.close()
        now = list(pool.actors)
        await pool.close()
        if shared is not None:
            shared.give_back(taken, now)
    return list(traces), pool.nodes, len(taken), run_cache


async def simulate_async(cfg: SimdistConfig | RunPlan, *, address: str | None = None,
                         workers: int | str | None = None, exhaustive: bool = False,
                         progress: bool = False, use_cache: bool = True,
                         trust_code: bool = False,
                         shared: SharedWorkers | None = None) -> ClusterPlan:
    """`cfg`: a config, or its RunPlan (simdist.planner.plan_run) when the caller planned
    already. `use_cache=False` (--no-cache): neither read nor write the shared caches.
    `trust_code=True`: allow `model.entrypoint` (it imports and runs the code it names).
    `shared`: a sweep's one Ray session and warm actors (SharedWorkers), used only when this
    plan has something to execute."""
    t0 = time.perf_counter()
    from simdist.cache.run import unusable_cache_dir

    if workers is not None:
        workers = check_workers(workers, "workers")
    config = cfg.cfg if isinstance(cfg, RunPlan) else trusting(cfg, trust_code)
    cache_warnings = []
    if use_cache and (problem := unusable_cache_dir(config.simulation.cache_dir)):
        cache_warnings.append(problem)  # one warning, and the run goes on without the cache
        import warnings

        from simdist.cache.store import CacheWarning

        warnings.warn(problem, CacheWarning, stacklevel=2)
        use_cache = False
    if isinstance(cfg, RunPlan) and not cache_warnings:
        run = cfg
    else:
        run = plan_run(config, use_cache=use_cache,
                       exhaustive=cfg.exhaustive if isinstance(cfg, RunPlan) else exhaustive)
    cfg = run.cfg
    phases = Phases(progress)
    layer_dir = cfg.simulation.cache_dir if use_cache else None
    from simdist.cache.run import (RunCache, disabled_summary, layer_summary, pipeline_summary,
                                   undispatched_summary)

    # The layer store is read here, in the driver: first the ranks it keeps rebuilt (tables,
    # read as they are), then the memo models of the others.
    traces: list[RankTrace | None] = [stored_rank(t) for t in run.tasks]
    todo = [i for i, tr in enumerate(traces) if tr is None]
    tasks = [run.tasks[i] for i in todo]
    jobs = [open_memo(t) for t in tasks]
    if nothing_to_execute(tasks, jobs):
        # Every class's model is stored: rebuild here, without Ray, actors or the dispatch
        # cache's service (nothing is dispatched, so its store is not even loaded).
        phases(f"rebuilding {len(run.tasks)} rank class(es) from the layer store in the "
               f"driver ({len(run.tasks) - len(tasks)} kept rebuilt; nothing to execute: "
               "no Ray started)")
        new = await build_in_driver(tasks, jobs)
        execution = dict(ray_address=None, ray=False, nodes=1, cluster_nodes=None, actors=0,
                         exhaustive=run.exhaustive)
    else:
        target = address or os.environ.get("RAY_ADDRESS")
        phases(f"joining the Ray cluster at {target}" if target else "starting a local Ray")
        with (ray_session(address) if shared is None
              else contextlib.nullcontext(shared.session())) as ray_address:
            import ray

            start_cache = (partial(RunCache.start, cfg.simulation.cache_dir, run.gpu)
                           if use_cache else None)  # called with the service's placement
            new, nodes, n_actors, run_cache = await watched(_run_tasks(
                tasks, workers or cfg.simulation.workers, cfg.simulation.rank_timeout_s,
                progress, start_cache, phases, jobs, shared), ray_address)
            execution = dict(ray_address=ray_address, ray=True, nodes=len(nodes),
                             cluster_nodes=len([n for n in ray.nodes() if n.get("Alive")]),
                             actors=n_actors, exhaustive=run.exhaustive)
            # (the classes read as kept dispatched nothing: their counters are zero)
            cache = (await run_cache.finish(new) if run_cache is not None
                     else disabled_summary(new))
    for i, trace in zip(todo, new):
        traces[i] = trace
        if use_cache:
            keep_rebuilt(run.tasks[i], trace)
    if not execution["ray"]:
        cache = (undispatched_summary(traces, cfg.simulation.cache_dir) if use_cache
                 else disabled_summary(traces))
    cache["layer"] = layer_summary(traces, layer_dir)
    cache["pipeline"] = pipeline_summary(traces)
    if cache_warnings:
        cache["warnings"] = [*cache.get("warnings", []), *cache_warnings]
    phases(f"merging {len(traces)} class(es) into {run.layout.world_size} rank rows")
    summary = dict(
        num_params=run.num_params,
        config=cfg.to_dict(),
        simdist_version=simdist.__version__,
        torch_version=torch.__version__,
        gpu=run.gpu.name,
        cache=cache,
        execution=execution,
        flops_per_token=run.flops_per_token,
    )
    plan = merge(run, traces, summary, calibration_for(cfg))
    plan.summary["sim_wall_s"] = time.perf_counter() - t0
    return plan


def simulate(cfg: SimdistConfig | RunPlan, **kwargs: Any) -> ClusterPlan:
    """Simulate one plan; see `simulate_async` for the options."""
    return asyncio.run(simulate_async(cfg, **kwargs))
