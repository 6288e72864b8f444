"""Every collective the simulated rank issues, with its group and bytes.

Collectives reach dispatch as `c10d.*` (process-group API: FSDP2, DDP, pipelining p2p) or
`_c10d_functional.*` ops (DTensor redistribution). Under the fake process group they are no-ops,
so this mode only records them. `bytes` is the full buffer of the operation (all-gather: output;
reduce-scatter: input; all-reduce: the tensor; all-to-all: input; send/recv: the message), the
convention the cost model's ring formulas take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from simdist.mode.context import StepContext
from simdist.mode.memory import fake_device_query, is_dtensor_dispatch
from simdist.opcount import tensor_bytes as _tensor_bytes
from simdist.trace import CollectiveEvent

_KINDS = {
    "all_gather": ("allgather", "all_gather"),
    "reduce_scatter": ("reduce_scatter",),
    "all_reduce": ("allreduce", "all_reduce"),
    "all_to_all": ("alltoall", "all_to_all", "shard_dim_alltoall"),
    "broadcast": ("broadcast",),
    "send": ("send", "isend"),
    "recv": ("recv", "irecv"),
}
_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor"}
_IGNORED = {"wait_tensor", "barrier", "monitored_barrier_"}


def collective_kind(op_name: str) -> str | None:
    for kind, prefixes in _KINDS.items():
        if any(op_name.lstrip("_").startswith(p) for p in prefixes):
            return kind
    return None


def _process_group(func: Any, args: tuple) -> dist.ProcessGroup | None:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except Exception:  # not a process group (e.g. a reduce op)
                continue
    if func.namespace != "c10d":
        for a in args:
            if isinstance(a, str):
                try:
                    return _resolve_process_group(a)
                except Exception:
                    continue
    return None


@dataclass(eq=False)
class CollectiveRecorder(TorchDispatchMode):
    ctx: StepContext
    group_dims: dict[str, str] = field(default_factory=dict)  # group_name -> mesh dim name
    events: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if (device := fake_device_query(func, args)) is not None:
            return device
        if is_dtensor_dispatch(types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if self.ctx.excluded or func.namespace not in _NAMESPACES:
            return out
        name = func._overloadpacket.__name__
        kind = collective_kind(name)
        if name == "wait_tensor" and self.ctx.kernels is not None:
            self.ctx.kernels.on_wait(args, out)
        if kind is None or name in _IGNORED:
            return out
        pg = _process_group(func, args)
        size = pg.size() if pg is not None else 1
        dim = self.group_dims.get(pg.group_name, "world") if pg is not None else "world"
        nbytes = max([_tensor_bytes(a) for a in args] + [_tensor_bytes(out)])
        # Point-to-point: the peer's rank within the group (c10d.send/recv_ take it as the only
        # int argument); -1 for collectives.
        peer = next((a for a in args if type(a) is int), -1) if kind in ("send", "recv") else -1
        module = self.ctx.module()
        if self.ctx.kernels is not None:
            self.ctx.kernels.on_collective(args, out, dim, module)
        self.events.append(CollectiveEvent(name, kind, dim, size, nbytes, self.ctx.phase, module,
                                           peer, self.ctx.weight))
        return out
