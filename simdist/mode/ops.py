"""FLOPs and bytes per op, by phase and module.

FLOPs come from torch's own formulas (`torch.utils.flop_counter.flop_registry`, the table behind
FlopCounterMode); bytes are the sizes of the op's tensor inputs and outputs (what a kernel reads
and writes from HBM, ignoring cache reuse). View and metadata ops move nothing and are skipped.
The counter records one event per kernel; streams.py aggregates them by (op, phase, module, input
shapes), so identical launches become one row with a count and per-row time estimates stay exact
(`count` times one launch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.flop_counter import flop_registry

from simdist.mode.context import StepContext
from simdist.mode.memory import is_dtensor_dispatch

# Collectives and bookkeeping are recorded elsewhere (collectives.py) or move no data
# (`prim.device`, `aten.sym_size`... answer metadata queries).
_SKIP_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor",
                    "profiler", "prim"}
# Allocation and aliasing ops: no kernel touches memory (`_unsafe_view` reinterprets the result
# of a copy; `empty*` only reserve).
_NO_TRAFFIC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
               "_unsafe_view", "detach", "alias", "lift_fresh", "set_", "resize_"}
# Factory ops write their output and read nothing.
_WRITE_ONLY = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
               "new_ones", "new_full", "fill_", "zero_", "randint", "rand", "randn", "arange",
               "scalar_tensor"}


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_iter(tree) if isinstance(t, torch.Tensor))


def _items(args: Any, out: Any) -> tuple[tuple[str, str, int], ...]:
    """("a", "shape:dtype", bytes) per tensor argument, then ("o", "", bytes) per output."""
    items = [("a", "x".join(map(str, t.shape)) + f":{str(t.dtype).removeprefix('torch.')}",
              t.numel() * t.element_size()) for t in tree_iter(args) if isinstance(t, torch.Tensor)]
    items += [("o", "", t.numel() * t.element_size())
              for t in tree_iter(out) if isinstance(t, torch.Tensor)]
    return tuple(items)


@dataclass(eq=False)
class OpCounter(TorchDispatchMode):
    """Appends one ((op, phase, module, weight, flops, write_only), items) event per executed
    kernel to `events` (see streams.py, which aggregates them into op rows)."""

    ctx: StepContext
    events: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if is_dtensor_dispatch(types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.ctx.excluded or self.ctx.phase == "init" or func.is_view:
            return out
        if func.namespace in _SKIP_NAMESPACES:
            return out
        packet = func._overloadpacket
        name = packet.__name__
        if name in _NO_TRAFFIC or not any(isinstance(t, torch.Tensor) for t in tree_iter(out)):
            return out
        flop_fn = flop_registry.get(packet)
        flops = int(flop_fn(*args, **kwargs, out_val=out)) if flop_fn is not None else 0
        head = (str(packet).removeprefix("aten."), self.ctx.phase, self.ctx.module(),
                self.ctx.weight, flops, name in _WRITE_ONLY)
        self.events.append((head, _items(args, out)))
        return out
