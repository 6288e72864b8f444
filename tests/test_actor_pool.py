"""simdist.workers.pool.ActorPool without Ray: stand-in actors record what they were asked, in
what order, and can fail."""

from __future__ import annotations

import asyncio

import pytest

from simdist.trace import RankTask
from simdist.workers import pool as pool_mod
from tests.conftest import make_task, spec


class _Method:
    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn = fn

    def remote(self, *args):  # noqa: ANN002, ANN201
        return self.fn(*args)


class StandIn:
    """Answers like RankWorker: `simulate` -> (trace, node, cache delta), `build` -> (result,
    node)."""

    def __init__(self, log: list, fail_layers: int | None = None) -> None:
        async def simulate(task, keep_streams, cache_arg):  # noqa: ANN001, ANN202
            await asyncio.sleep(0)
            log.append(("simulate", task.model.n_layers))
            if task.model.n_layers == fail_layers:
                raise RuntimeError("boom")
            return f"trace-{task.model.n_layers}", "node-a", None

        async def build(job, runs):  # noqa: ANN001, ANN202
            await asyncio.sleep(0)
            log.append(("build", job))
            return f"built-{job}", "node-a"

        self.simulate = _Method(simulate)
        self.build = _Method(build)
        self.__ray_ready__ = _Method(lambda: None)  # (no start to wait for: None, started)


def _task(n_layers: int) -> RankTask:
    return make_task(spec("llama3-debug", n_layers=n_layers), seq_len=128)


@pytest.fixture
def killed(monkeypatch):
    out: list = []
    monkeypatch.setattr(pool_mod.ray, "kill", out.append)
    return out


def test_waiting_calls_go_most_expensive_first_and_builds_before_all(killed):
    log: list = []

    async def main():  # noqa: ANN202
        actor = StandIn(log)
        pool = pool_mod.ActorPool([actor], timeout_s=10)
        # Submitted before the single actor's driver first runs: all wait together.
        # (a build with executed runs goes to an actor; one of stored events runs here)
        futs = [pool.execute(_task(n)) for n in (2, 8, 4)] + [pool.build("job", ["runs"])]
        results = await asyncio.gather(*futs)
        await pool.close()
        return results, actor

    results, actor = asyncio.run(main())
    assert log == [("build", "job"), ("simulate", 8), ("simulate", 4), ("simulate", 2)]
    assert results == ["trace-2", "trace-8", "trace-4", "built-job"]
    assert killed == [actor]


def test_a_failed_call_reaches_its_caller_and_the_pool_goes_on(killed):
    log: list = []

    async def main():  # noqa: ANN202
        pool = pool_mod.ActorPool([StandIn(log, fail_layers=4)], timeout_s=10)
        bad, good = pool.execute(_task(4)), pool.execute(_task(2))
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        assert await good == "trace-2"
        assert pool.nodes == {"node-a"}
        await pool.close()

    asyncio.run(main())
    assert log == [("simulate", 4), ("simulate", 2)]


def test_a_call_past_the_timeout_fails(killed):
    async def main():  # noqa: ANN202
        actor = StandIn([])

        async def hang(task, keep_streams, cache_arg):  # noqa: ANN001, ANN202
            await asyncio.sleep(30)

        actor.simulate = _Method(hang)
        pool = pool_mod.ActorPool([actor], timeout_s=0.05)
        with pytest.raises(asyncio.TimeoutError) as info:  # RankTimeout is a TimeoutError
            await pool.execute(_task(2))
        await pool.close()
        # the CLI prints str(): it names the rank and the key to raise
        assert str(info.value).startswith(
            "rank 0 did not finish within simulation.rank_timeout_s = 0.05 s")

    asyncio.run(main())
