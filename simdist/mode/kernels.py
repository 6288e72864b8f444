"""The step as the GPU runs it: every kernel and collective in issue order, each on its stream,
with the waits the real code has (the input of the time model's event simulation).

Streams: ops run on "compute", except those FSDP2 runs inside its collectives (the all-gather
copy-in, the reduce-scatter copy-in and the gradient division / accumulation after it, on
FSDP2's own streams: `foreach_all_gather` and `foreach_reduce` run under their stream context);
a collective runs on one stream per process group, named by its mesh dim (NCCL orders the
collectives of one communicator).

Waits, from storage identity of the fake tensors: a compute op that reads a storage last
written on another stream (a collective's buffer, or an op of FSDP2's streams) waits for that
event — FSDP2's copy-out waits for the unit's all-gather, a TP matmul for the DTensor all-gather
of its input, the pipeline's forward for its recv. The joins the real code makes at the end of a
backward (FSDP2's final callback waits for the reduce-scatters) and before the optimizer are
rules of the simulation (costmodel/step_sim.py), by phase.

The OpCounter and CollectiveRecorder notify this recorder of what they record, so the i-th "op"
event is the i-th event of the ops stream and the j-th "coll" the j-th of the collectives
stream (summarize joins them by position). A wait names the awaited event by its module and
how many events of that module and stream lie back to it (the waiting event's stream is
compute, the awaited one's another), so blocks the layer memo inserts in between change
nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_iter

from simdist.mode.context import StepContext
from simdist.mode.memory import MemoryTracker, local_tensor
from simdist.trace import Boundary, KernelEvent

COMPUTE = "compute"
JOIN = -1  # wait_back of an event that waits for every other stream
_WAITS_ALL = -2  # (the `waited` argument of _append for such an event; -1: no wait)
FSDP_ALL_GATHER = "fsdp_all_gather"
FSDP_REDUCE = "fsdp_reduce"


def _storages(tree: Any) -> Iterator[torch.UntypedStorage]:
    for t in tree_iter(tree):
        if isinstance(t, torch.Tensor):
            yield local_tensor(t).untyped_storage()


class KernelStream:
    def __init__(self, ctx: StepContext, memory: MemoryTracker | None = None) -> None:
        self.ctx = ctx
        self.events: list[KernelEvent] = []
        # Points of the schedule with the positions of the kernel and memory streams there
        # (the pipeline memo cuts the streams at them); `memory`: the step's memory recorder.
        self.boundaries: list[Boundary] = []
        self._memory = memory
        # storage -> index of the event of another stream that last wrote it (not yet waited)
        self._written: dict[int, int] = {}
        # (module, stream) -> indices of its events
        self._module_events: dict[tuple[Any, str], list[int]] = {}
        self.unit: str | None = None  # the FSDP2 unit whose post-backward is running

    def _writes(self, tree: Any, index: int) -> None:
        for st in _storages(tree):
            key = st._cdata
            if key not in self._written:  # a freed storage's address may be reused: forget it
                weakref.finalize(st, self._written.pop, key, None)
            self._written[key] = index

    def _append(self, kind: str, stream: str, label: str = "", waited: int = -1,
                module: Any = None) -> None:
        # FSDP2's post-backward of a unit belongs to the unit, also where it runs outside the
        # unit's backward (the pipeline's deferred reductions).
        if self.unit is not None:
            module = self.unit
        elif module is None:
            module = self.ctx.module()
        index = len(self.events)
        wait_module, wait_stream, wait_back = "", "", 0
        if waited == _WAITS_ALL:
            wait_back = JOIN
        elif waited >= 0:
            target = self.events[waited]
            wait_module, wait_stream = target.module, target.stream
            same = self._module_events[(target.module, target.stream)]
            wait_back = len(same) - bisect.bisect_left(same, waited)
        self._module_events.setdefault((module, stream), []).append(index)
        self.events.append(KernelEvent(kind, self.ctx.phase, module, stream, wait_module,
                                       wait_stream, wait_back, self.ctx.weight, label))

    def on_op(self, args: Any, out: Any, module: Any = None) -> None:
        """`module`: the running module, where the notifying recorder computed it already."""
        stream, index, waited = self.ctx.stream, len(self.events), -1
        if stream == COMPUTE:
            found = {self._written.pop(st._cdata) for st in _storages(args)
                     if st._cdata in self._written}
            # One event waited for, or several (a foreach op over the gradients of many
            # reductions): then it waits for every stream, as the code's stream joins do.
            waited = found.pop() if len(found) == 1 else _WAITS_ALL if found else -1
            for st in _storages(out):  # a compute op's output is the compute stream's
                self._written.pop(st._cdata, None)
        else:
            self._writes((args, out), index)
        self._append("op", stream, waited=waited, module=module)

    def on_wait(self, args: Any, out: Any) -> None:
        """A functional collective's `wait_tensor`: its result (under fake tensors a new
        storage) is the collective's output."""
        found = [self._written[st._cdata] for st in _storages(args) if st._cdata in self._written]
        if found:
            for st in _storages(out):
                key = st._cdata
                if key not in self._written:
                    weakref.finalize(st, self._written.pop, key, None)
                self._written[key] = max(found)

    def on_collective(self, args: Any, out: Any, mesh_dim: str, module: Any = None) -> None:
        self._writes((args, out), len(self.events))
        self._append("coll", mesh_dim, module=module)

    def mark(self, label: str) -> None:
        """A point of the schedule (a pipeline action's begin / end), in the stream and among
        the boundaries."""
        self.boundary(label)
        self._append("mark", "", label)

    def boundary(self, label: str) -> None:
        """A point of the schedule recorded beside the streams only (not a kernel event)."""
        memory = len(self._memory.events) if self._memory is not None else 0
        self.boundaries.append(Boundary(label, len(self.events), memory))


@contextlib.contextmanager
def fsdp_streams(ctx: StepContext) -> Iterator[None]:
    """FSDP2 runs its all-gather and reduce-scatter (with their copy-in and the gradient
    arithmetic after the reduction) under its own CUDA streams; on the fake cpu device stream
    contexts do nothing, so the two functions are wrapped to say which stream their ops use."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    originals = {"foreach_all_gather": FSDP_ALL_GATHER, "foreach_reduce": FSDP_REDUCE}
    saved = {name: getattr(group, name) for name in originals}
    cls = group.FSDPParamGroup
    # (Unshard keeps the running module's name, as the other recorders do: a prefetch names
    # the unit two blocks ahead, which the layer memo cannot renumber in a 2-block stage.)
    methods = {name: getattr(cls, name) for name in ("post_backward",)}

    def on(fn: Any, stream: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with ctx.on_stream(stream):
                return fn(*args, **kwargs)
        return run

    def of_unit(fn: Any) -> Any:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            kernels = ctx.kernels
            if kernels is None:
                return fn(self, *args, **kwargs)
            prev, kernels.unit = kernels.unit, self._module_fqn or ""
            try:
                return fn(self, *args, **kwargs)
            finally:
                kernels.unit = prev
        return run

    for name, stream in originals.items():
        setattr(group, name, on(saved[name], stream))
    for name, fn in methods.items():
        setattr(cls, name, of_unit(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(group, name, fn)
        for name, fn in methods.items():
            setattr(cls, name, fn)
