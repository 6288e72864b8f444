"""cancel_and_wait ends a task that loses one cancellation (as Python < 3.12's wait_for can)."""

from __future__ import annotations

import asyncio

from simdist.workers.cancel import cancel_and_wait


async def _loses_first_cancel(log: list) -> None:
    """A watcher whose first cancellation is lost, as wait_for loses one that arrives when its
    inner awaitable completes: it catches it once and goes on polling."""
    lost = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if lost:
                log.append("ended")
                raise
            lost = True
            log.append("lost")


def test_a_task_that_loses_a_cancellation_still_ends():
    async def main() -> list:
        log: list = []
        task = asyncio.ensure_future(_loses_first_cancel(log))
        await asyncio.sleep(0.02)
        task.cancel()  # one cancellation, as before: the task goes on
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done
        await asyncio.wait_for(cancel_and_wait(task), 5)
        assert task.cancelled()
        return log

    assert asyncio.run(main()) == ["lost", "ended"]


def test_done_tasks_and_their_exceptions_are_collected():
    async def boom() -> None:
        raise ValueError("x")

    async def main() -> None:
        t = asyncio.ensure_future(boom())
        await asyncio.sleep(0)
        await cancel_and_wait(t)  # already done: returns, the exception retrieved
        assert isinstance(t.exception(), ValueError)

    asyncio.run(main())
