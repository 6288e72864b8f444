"""Pool sizing and placement of RankWorker actors."""

from __future__ import annotations

import math

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from simdist.workers.actor import RankWorker

# An actor with torch imported holds ~360 MiB; a rank simulation is single-threaded Python.
ACTOR_MEMORY_BYTES = 400 * 2**20


def pool_size(requested: int | str | None, num_tasks: int) -> int:
    """`auto`: one actor per CPU of the cluster, never more actors than tasks. Rank simulations
    are independent CPU-bound jobs, and with the layer memo a class costs about what starting
    an actor costs (importing torch: ~2.8 s here): an actor beyond the CPUs only adds its
    start-up (measured: 3 classes on 2 CPUs, 3 actors 12.5 s vs 2 actors, see
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
