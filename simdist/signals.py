"""SIGTERM handled like Ctrl-C: the run stops the same orderly way (the coroutine is cancelled,
the actors killed, Ray shut down, nothing written) and the CLI exits 143 instead of 130, with one
line and no stack dump."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stop:
    signal_name: str | None = None  # "SIGINT" / "SIGTERM" once one arrived

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.signal_name == "SIGTERM" else signal.SIGINT)


@contextmanager
def sigterm_as_interrupt():  # noqa: ANN201
    """While inside: SIGTERM does what SIGINT does at that moment — asyncio.run's handler
    (cancel the main task, then KeyboardInterrupt) or Python's (KeyboardInterrupt now)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum, frame):  # noqa: ANN001, ANN202
        stop.signal_name = "SIGTERM"
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, before)
