"""Ending asyncio tasks that hold no cleanup of their own (watchers, queue drivers).

Before Python 3.12, `asyncio.wait_for` returns its inner result when a cancellation arrives as
the inner awaitable completes, and the cancellation is lost (CPython bpo-42130, gh-86296). A
task cancelled once at that moment goes on — the Ray watcher polls forever, a pool driver waits
for its next call — and whoever awaits it waits forever: measured here as a run that had failed
but never returned. Such tasks are cancelled until they are done."""

from __future__ import annotations

import asyncio

RECANCEL_S = 0.05  # how long a cancelled task may take before it is cancelled again


async def cancel_and_wait(*tasks: asyncio.Task) -> None:
    """Cancel `tasks` and return when every one has ended. Only for tasks whose cancellation
    runs no cleanup that a second cancellation could cut short."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for t in tasks:  # retrieve what they raised (no "exception never retrieved" at exit)
        if not t.cancelled():
            t.exception()
