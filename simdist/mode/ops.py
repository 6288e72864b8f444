"""FLOPs and bytes per op, by phase and module, by the rule of simdist/opcount.py (torch's FLOP
formulas; the sizes of the op's tensor inputs and outputs; views and metadata move nothing).
The counter records one event per kernel; streams.py aggregates them by (op, phase, module, input
shapes), so identical launches become one row with a count and per-row time estimates stay exact
(`count` times one launch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from simdist.mode.context import StepContext
from simdist.mode.memory import fake_device_query, is_dtensor_dispatch
from simdist.opcount import is_write_only, kernel_flops, kernel_writes, shape_text
from simdist.trace import OpEvent, OpHead, OpItem

def _items(args: Any, out: Any) -> tuple[OpItem, ...]:
    """An OpItem per tensor argument, then one per tensor written (opcount.written)."""
    items = [OpItem("a", shape_text(t), t.numel() * t.element_size())
             for t in tree_iter(args) if isinstance(t, torch.Tensor)]
    items += [OpItem("o", "", t.numel() * t.element_size())
              for t in tree_iter(out) if isinstance(t, torch.Tensor)]
    return tuple(items)


@dataclass(eq=False)
class OpCounter(TorchDispatchMode):
    """Appends one OpEvent per executed kernel to `events` (streams.py aggregates them into
    op rows)."""

    ctx: StepContext
    events: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if (device := fake_device_query(func, args)) is not None:
            return device
        if is_dtensor_dispatch(types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.ctx.excluded or self.ctx.phase == "init":
            return out
        wrote = kernel_writes(func, args, kwargs, out)
        if wrote is None:
            return out
        head = OpHead(str(func._overloadpacket).removeprefix("aten."), self.ctx.phase,
                      self.ctx.module(), self.ctx.weight, kernel_flops(func, args, kwargs, out),
                      is_write_only(func))
        self.events.append(OpEvent(head, _items(args, wrote)))
        if self.ctx.kernels is not None:
            self.ctx.kernels.on_op((args, kwargs), out, head.module)
        return out
