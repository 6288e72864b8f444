"""Where in the step we are: phase (fwd / bwd / optim), micro-batch weight, and whether the
current dispatch belongs to simdist's bookkeeping rather than to the simulated program.

Shared by the recording modes so that each stays one concern."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from torch.distributed._tools.mod_tracker import ModTracker

PHASES = ("init", "fwd", "bwd", "optim")


@functools.lru_cache(maxsize=4096)  # called for every parent on every op: names repeat
def _module_order(name: str) -> tuple:
    return (name.count("."),
            tuple((0, int(seg), "") if seg.isdigit() else (1, 0, seg) for seg in name.split(".")))


class StepContext:
    """Mutable cursor read by every recorder on every op."""

    def __init__(self, track_modules: bool = True) -> None:
        self.phase = "init"
        # How many identical micro-batches the op being executed stands for (see step.py).
        self.weight = 1
        # ModTracker hooks module inputs with multi-grad hooks, which autograd.grad(inputs=...)
        # rejects for leaf inputs (zero-bubble pipelines split backward that way): such runs
        # attribute ops to no module.
        self.mod_tracker = ModTracker() if track_modules else contextlib.nullcontext()
        self._excluded = threading.local()
        # The GPU stream ops are issued on (mode/kernels.py), and the recorder of the kernel
        # stream that the op and collective recorders notify (None: not recorded).
        self.stream = "compute"
        self.kernels: Any = None

    @contextlib.contextmanager
    def in_phase(self, phase: str, weight: int = 1) -> Iterator[None]:
        prev = self.phase, self.weight
        self.phase, self.weight = phase, weight
        try:
            yield
        finally:
            self.phase, self.weight = prev

    @contextlib.contextmanager
    def on_stream(self, stream: str) -> Iterator[None]:
        prev, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = prev

    def module(self) -> str:
        """Innermost module FQN that is running (forward or backward)."""
        parents = getattr(self.mod_tracker, "parents", None)
        if not parents:
            return ""
        # Deepest module; ties (sibling modules whose backward hooks are open together, e.g.
        # wq/wk/wv sharing one input, or two blocks in backward) break by name, numbers compared
        # as numbers (layers.10 after layers.9), so attribution is deterministic and does not
        # depend on how many digits a block index has.
        best = max(parents, key=_module_order)
        # ModTracker names the root module by its class ("FSDPLlama3.layers.0"); report FQNs
        # relative to the model, without wrapper segments.
        _, _, fqn = best.partition(".")
        return fqn.replace("._checkpoint_wrapped_module", "")

    @property
    def excluded(self) -> bool:
        return getattr(self._excluded, "depth", 0) > 0

    @contextlib.contextmanager
    def exclude(self) -> Iterator[None]:
        """Ops run inside are simdist's or torch's bookkeeping, not the simulated program."""
        self._excluded.depth = getattr(self._excluded, "depth", 0) + 1
        try:
            yield
        finally:
            self._excluded.depth -= 1
