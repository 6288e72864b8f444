"""What one dispatched op does as a GPU kernel, the one rule that the op recorder (mode/ops.py)
and the dispatch cache's cost rows (cache/costs.py) share: whether it launches a kernel, its
FLOPs (torch's own formulas, `flop_registry`, the table behind FlopCounterMode) and the HBM
bytes it reads and writes (tensor sizes, ignoring cache reuse)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_iter
from torch.utils.flop_counter import flop_registry

# Collectives and bookkeeping are recorded elsewhere (mode/collectives.py) or move no data
# (`prim.device`, `aten.sym_size`... answer metadata queries).
SKIP_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor",
                   "profiler", "prim"}
# Allocation and aliasing ops: no kernel touches memory (`_unsafe_view` reinterprets the result
# of a copy; `empty*` only reserve).
NO_TRAFFIC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "_unsafe_view", "detach", "alias", "lift_fresh", "set_", "resize_"}
# Factory ops write their output and read nothing.
WRITE_ONLY = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
              "new_ones", "new_full", "fill_", "zero_", "randint", "rand", "randn", "arange",
              "scalar_tensor"}


def tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_iter(tree) if isinstance(t, torch.Tensor))


def shape_text(t: torch.Tensor) -> str:
    """"AxB:dtype", how op rows name a tensor argument (the kernel model parses it)."""
    return "x".join(map(str, t.shape)) + f":{str(t.dtype).removeprefix('torch.')}"


def written(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> Any:
    """The tensors the kernel writes: its outputs, or, for an in-place op that returns nothing
    (`_foreach_mul_`, `_foreach_addcdiv_`: the optimizer's foreach kernels), the arguments its
    schema marks as written (`Tensor(a!)[] self`)."""
    if any(isinstance(t, torch.Tensor) for t in tree_iter(out)):
        return out
    schema = func._schema.arguments
    named = dict(zip((a.name for a in schema), args)) | kwargs
    return [named[a.name] for a in schema
            if a.alias_info is not None and a.alias_info.is_write and a.name in named]


def kernel_writes(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """What the op's kernel writes (see `written`), or None where it launches no kernel: views,
    metadata, allocation and collective ops, and ops that neither return a tensor nor write one
    in place move no data."""
    if not isinstance(func, torch._ops.OpOverload) or func.is_view \
            or func.namespace in SKIP_NAMESPACES:
        return None
    if func._overloadpacket.__name__ in NO_TRAFFIC:
        return None
    wrote = written(func, args, kwargs, out)
    return wrote if any(isinstance(t, torch.Tensor) for t in tree_iter(wrote)) else None


def is_write_only(func: torch._ops.OpOverload) -> bool:
    return func._overloadpacket.__name__ in WRITE_ONLY


def kernel_flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> int:
    """torch's FLOP formula for the op; 0 where it has none (memory-bound ops)."""
    flop_fn = flop_registry.get(func._overloadpacket)
    return int(flop_fn(*args, **kwargs, out_val=out)) if flop_fn is not None else 0


def bytes_read(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> int:
    return 0 if is_write_only(func) else tensor_bytes((args, kwargs))
