"""Storage-level memory timeline.

Every storage that an op creates is tracked from birth (its first appearance as an op output) to
death (a weakref finaliser on the storage object), and FSDP2's `UntypedStorage.resize_` calls
(which free and re-allocate unsharded parameters outside dispatch) are followed through a patch
installed only while the tracker is active. A saved-tensors hook marks the storages autograd
keeps for backward: their live total is the activation curve."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from simdist.mode.context import StepContext
from simdist.trace import MemoryEvent


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds the bytes (a DTensor's local shard)."""
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t


def is_fake(t: Any) -> bool:
    """Whether `t` is a fake tensor (or a DTensor over one): what a CUDA tensor stands as here."""
    return isinstance(t, torch.Tensor) and isinstance(local_tensor(t), FakeTensor)


def is_dtensor_dispatch(types: Any) -> bool:
    # DTensor-level ops re-dispatch onto local shards; count only those, once.
    return any(getattr(t, "__name__", "") == "DTensor" for t in types)


_DEVICE_QUERY = torch.ops.prim.device.default


def fake_device_query(func: Any, args: Any) -> torch.device | None:
    """The answer to a fake tensor's device query (`prim.device`, which C++ code such as the
    autograd engine and DTensor's dispatch asks of a tensor with a Python-defined device) as
    FakeTensorMode gives it; None for any other op. Every recording mode (and mode/cuda.py's)
    passes this query down unchanged: it allocates, launches and communicates nothing. It is
    most of what reaches dispatch, so the first mode answers it and the others never see it."""
    if func is not _DEVICE_QUERY or len(args) != 1 or not isinstance(args[0], FakeTensor):
        return None
    t = args[0]  # as torch's fake_tensor._device_handler answers it
    return torch.device("meta") if t.fake_mode.in_kernel_invocation else t.fake_device


@dataclass
class StorageInfo:
    nbytes: int
    category: str = "other"
    saved: bool = False


@dataclass(eq=False)
class MemoryTracker(TorchDispatchMode):
    """Appends a MemoryEvent per change of live or saved bytes to `events`."""

    ctx: StepContext
    storages: dict[int, StorageInfo] = field(default_factory=dict)
    events: list[tuple] = field(default_factory=list)
    live: int = 0
    saved_live: int = 0

    def __post_init__(self) -> None:
        super().__init__()
        self._resize_orig = None
        self._closed = False

    # -- registration ---------------------------------------------------------------------
    def track(self, t: torch.Tensor, category: str = "other", op: str = "") -> None:
        st = local_tensor(t).untyped_storage()
        key = st._cdata
        if key in self.storages:
            return
        nbytes = st.nbytes()
        self.storages[key] = StorageInfo(nbytes, category)
        weakref.finalize(st, self._on_free, key)
        self._change(nbytes, op)

    def track_existing(self, tensors: Any, category: str) -> None:
        """Register storages alive before tracking started (parameters, optimizer state)."""
        for t in tree_iter(tensors):
            if isinstance(t, torch.Tensor):
                self.track(t, category, op="<resident>")

    def close(self) -> list[tuple]:
        """End the timeline: storages freed later (the model's teardown) are not the step's."""
        events, self.events = self.events, []
        self._closed = True
        return events

    def start(self) -> tuple[int, int]:
        """Start the step's timeline here: returns (live, saved) bytes at this point."""
        self.events.clear()
        return self.live, self.saved_live

    # -- accounting -----------------------------------------------------------------------
    def _change(self, delta: int, op: str) -> None:
        if delta == 0 or self._closed:
            return
        self.live += delta
        self.events.append(MemoryEvent(self.ctx.phase, self.ctx.module(), op, delta, 0))

    def _on_free(self, key: int) -> None:
        info = self.storages.pop(key, None)
        if info is None:
            return
        if info.saved:
            self._saved_change(-info.nbytes)
        self._change(-info.nbytes, "<free>")

    def _on_resize(self, st: torch.UntypedStorage, nbytes: int) -> None:
        info = self.storages.get(st._cdata)
        if info is None:
            return
        delta = nbytes - info.nbytes
        info.nbytes = nbytes
        if info.saved:
            self._saved_change(delta)
        self._change(delta, "resize_")

    def _saved_change(self, delta: int) -> None:
        if delta == 0 or self._closed:
            return
        self.saved_live += delta
        self.events.append(MemoryEvent(self.ctx.phase, self.ctx.module(), "", 0, delta))

    def mark_saved(self, t: torch.Tensor) -> None:
        """Called by the saved-tensors hook: autograd keeps `t` until backward."""
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter) or isinstance(t, torch.nn.Parameter):
            return  # parameters (also FSDP's unsharded and DTensor ones) are not activations
        info = self.storages.get(local_tensor(t).untyped_storage()._cdata)
        if info is None or info.saved or info.category != "other":
            return
        info.saved = True
        self._saved_change(info.nbytes)

    def saved_tensors_hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(t: torch.Tensor) -> torch.Tensor:
            if not self.ctx.excluded:
                self.mark_saved(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    # -- dispatch -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if (device := fake_device_query(func, args)) is not None:
            return device
        if is_dtensor_dispatch(types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if not self.ctx.excluded:
            name = func.__name__
            for t in tree_iter(out):
                if isinstance(t, torch.Tensor):
                    self.track(t, op=name)
        return out

    def __enter__(self) -> "MemoryTracker":
        tracker = self
        orig = torch.UntypedStorage.resize_
        self._resize_orig = orig

        def resize_(st: torch.UntypedStorage, size: int):  # noqa: ANN202
            result = orig(st, size)
            tracker._on_resize(st, int(size))
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize_orig
        super().__exit__(*exc)
