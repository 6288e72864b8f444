"""Pool sizing and placement of RankWorker actors, and the queue that feeds them."""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from simdist.mode.layer_memo import rank_blocks
from simdist.trace import StepStreams
from simdist.trace import RankTask, SymbolicDim
from simdist.workers.actor import RankWorker
from simdist.workers.cancel import cancel_and_wait

def pool_size(requested: int | str | None, num_tasks: int) -> int:
    """`auto`: one actor per CPU of the cluster, never more actors than calls that can run at
    once (`num_tasks`). Executions are independent CPU-bound jobs, and with the layer memo one
    costs less than starting an actor (importing torch: ~2.8 s here): an actor beyond the CPUs
    only adds its start-up (measured: 3 classes on 2 CPUs, 3 actors 12.5 s vs 2 actors, see
    benchmarks/README.md)."""
    if isinstance(requested, int):
        return max(1, min(requested, num_tasks))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, num_tasks))


def start_workers(n: int) -> list:
    """Start `n` actors spread round-robin over the alive nodes, each taking an even share of
    its node's CPUs (fractional, so more actors than cores still schedule)."""
    nodes = [nd for nd in ray.nodes() if nd.get("Alive") and nd["Resources"].get("CPU", 0) > 0]
    remote_cls = ray.remote(RankWorker)
    actors = []
    per_node = math.ceil(n / max(1, len(nodes)))
    for i in range(n):
        node = nodes[i % len(nodes)]
        share = min(1.0, node["Resources"]["CPU"] / per_node)
        actors.append(remote_cls.options(
            num_cpus=share,
            max_restarts=1,
            max_task_retries=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=True),
        ).remote())
    return actors


class RankTimeout(TimeoutError):
    """A rank's simulation call ran past `simulation.rank_timeout_s`."""

    def __init__(self, rank: int | None, timeout_s: float, started: bool = True) -> None:
        super().__init__(rank, timeout_s, started)
        self.rank, self.timeout_s, self.started = rank, timeout_s, started

    def __str__(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "a rank"
        if not self.started:  # the call never ran: Ray could not place or start the actor
            return (f"{who}'s Ray actor did not start within simulation.rank_timeout_s = "
                    f"{self.timeout_s:g} s (no free CPU on the Ray cluster? lower "
                    "simulation.workers, or end the Ray jobs holding its CPUs)")
        return (f"{who} did not finish within simulation.rank_timeout_s = {self.timeout_s:g} s "
                "(raise it, or check the Ray cluster's health)")


def _call_rank(call: tuple) -> int | None:
    kind, what, *_ = call
    task = what.task if kind == "build" else what
    return getattr(task, "rank", None)


class ActorPool:
    """Feeds the rank actors, one call per actor at a time. Waiting calls are taken most
    expensive first (blocks to execute; memo builds, which complete a rank, before anything):
    a free actor takes the longest waiting execution, so short ones fill the gaps at the end
    instead of a long one running alone last. Call `close` when done; it ends the actors
    unless they are not the pool's own (`owned=False`: a sweep's warm actors, which it ends)."""

    def __init__(self, actors: list, timeout_s: float, run_cache: Any = None,
                 owned: bool = True) -> None:
        self.actors = list(actors)
        self._owned = owned
        self.nodes: set[str] = set()
        self._timeout_s = timeout_s
        self._run_cache = run_cache  # simdist.cache.run.RunCache, or None (--no-cache)
        # each actor's start, to tell a call that never ran from one that ran too long
        self._ready = {id(a): a.__ray_ready__.remote() for a in self.actors}
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._seq = itertools.count()  # equal priority: first come, first served
        self._drivers = [asyncio.create_task(self._drive(a)) for a in actors]

    def execute(self, task: RankTask, keep_streams: bool = False) -> asyncio.Future:
        """Execute `task` as it is on some actor; resolves to its RankTrace."""
        if not self.actors:
            raise RuntimeError("ActorPool without actors cannot execute ranks")
        return self._submit(-rank_blocks(task), ("simulate", task, keep_streams))

    def build(self, job: Any, runs: list[StepStreams]) -> asyncio.Future:
        """MemoJob.build on some actor, or in this process (a thread) when the pool has no
        actors or the model comes from the layer store (`runs` empty: a build of stored
        events is shorter than a call to an actor); resolves to its BuildResult."""
        if not self.actors or not runs:
            return asyncio.ensure_future(self._build_here(job, runs))
        return self._submit(-math.inf, ("build", job, runs))

    def symbolic(self, task: RankTask, dim: SymbolicDim) -> asyncio.Future:
        """`task`'s step with `dim` symbolic on some actor; resolves to its SymbolicTrace."""
        if not self.actors:
            raise RuntimeError("ActorPool without actors cannot execute ranks")
        return self._submit(-rank_blocks(task), ("symbolic", task, dim))

    async def _build_here(self, job: Any, runs: list[StepStreams]) -> Any:
        result = await asyncio.to_thread(job.build, runs)
        if ray.is_initialized():  # (never start Ray to name the node)
            self.nodes.add(ray.get_runtime_context().get_node_id())
        return result

    def _submit(self, priority: float, call: tuple) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((priority, next(self._seq), call, fut))
        return fut

    async def _drive(self, actor: Any) -> None:
        while True:
            _, _, call, fut = await self._queue.get()
            if fut.done():  # its rank already failed
                continue
            try:
                result = await asyncio.wait_for(self._call(actor, call), self._timeout_s)
            except asyncio.TimeoutError:  # its str() is empty: say which rank and which key
                if not fut.done():
                    fut.set_exception(RankTimeout(_call_rank(call), self._timeout_s,
                                                  started=self._started(actor)))
                # The actor is still busy with the call (an actor runs its calls one at a
                # time): every later call would queue behind it. Replace it.
                actor = self._replace(actor)
            except Exception as e:  # noqa: BLE001 - delivered to whoever awaits the call
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

    def _started(self, actor: Any) -> bool:
        ref = self._ready.get(id(actor))
        return ref is None or bool(ray.wait([ref], timeout=0)[0])

    def _replace(self, actor: Any) -> Any:
        ray.kill(actor, no_restart=True)
        new = start_workers(1)[0]
        self.actors = [new if a is actor else a for a in self.actors]
        self._ready.pop(id(actor), None)
        self._ready[id(new)] = new.__ray_ready__.remote()
        return new

    async def _call(self, actor: Any, call: tuple) -> Any:
        kind, *args = call
        if kind in ("build", "symbolic"):
            result, node = await getattr(actor, kind).remote(*args)
            self.nodes.add(node)
            return result
        task, keep_streams = args
        cache_arg = self._run_cache.arg if self._run_cache is not None else None
        trace, node, delta = await actor.simulate.remote(task, keep_streams, cache_arg)
        if delta is not None:  # the shared dispatch cache's new entries
            self._run_cache.merge(delta)
        self.nodes.add(node)
        return trace

    async def close(self) -> None:
        """Stop feeding and end the actors now: their drivers hold the pool in a reference
        cycle, and an actor left for the garbage collector keeps its CPU from the next run's
        actors (measured: the next run's actors started 15 s late)."""
        await cancel_and_wait(*self._drivers)
        self._drivers = []
        if self._owned:
            for a in self.actors:
                ray.kill(a)
        self.actors = []
