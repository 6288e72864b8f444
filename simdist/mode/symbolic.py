"""One rank's step with a training dimension (micro-batch or sequence length) as a size symbol:
FakeTensorMode with a ShapeEnv, the step's inputs created with a symbolic size, so every
storage the memory tracker records has a sympy expression for its size.

What makes the expressions exact, and where they hold:
- the same code runs as in `simdist run` (mode/rank.py: run_rank_step), recording only the
  memory stream: the op and collective recorders turn sizes into Python ints (FLOP formulas,
  byte counts), and an int of a symbolic size is a guard that fixes the symbol to its hint;
- every branch the program takes on a size (torch's own shape checks, DTensor's even-shard
  tests, slicing bounds) is a ShapeEnv guard, kept with the trace: the expressions hold for the
  k that satisfy all of them (and the range the ShapeEnv assumed: k >= 2, as 0 and 1 are
  specialised by torch's broadcasting rules); a guard that pins k to its hint is reported
  (`specialised`), and an op whose output size depends on data raises (no expression);
- the dimension is `period` x k, so a size the plan divides evenly (sequence parallel's
  seq / tp, context parallel's seq / 2cp) is a polynomial in k, not a floor division;
- FakeTensorMode's process-wide dispatch cache, which the shared cache warms (cache/warm.py),
  is swapped for an empty one for the run: nothing is read from it or added to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from simdist.mode.rank import StepInputs, run_rank_step
from simdist.mode.step import microbatch_span
from simdist.parallel.data_parallel import grad_sync_rule
from simdist.trace import (SIZE_SYMBOL, MemoryEvent, RankTask, SizeGuard, SymbolicDim,
                           SymbolicTrace)

K = sympy.Symbol(SIZE_SYMBOL, integer=True, positive=True)
DIMENSIONS = ("training.micro_batch", "training.seq_len")


@contextlib.contextmanager
def private_dispatch_cache() -> Iterator[None]:
    """FakeTensorMode's class-level dispatch cache replaced by an empty one while inside (a
    symbolic run's entries keyed on sizes of its own ShapeEnv go to that ShapeEnv's cache
    anyway; this keeps the concrete ones out of the shared cache too)."""
    saved = FakeTensorMode.cache
    FakeTensorMode.cache = {}
    try:
        yield
    finally:
        FakeTensorMode.cache = saved


def _size_source(name: str) -> Any:
    from torch._dynamo.source import ConstantSource

    return ConstantSource(name)


def execute_symbolic(task: RankTask, dim: SymbolicDim) -> SymbolicTrace:
    """Execute `task`'s step with `dim` symbolic (k = dim.hint picks the branches; `task` is
    planned at the dimension's value period x hint)."""
    if dim.key not in DIMENSIONS:
        raise ValueError(f"{dim.key}: not a symbolic dimension; allowed: {', '.join(DIMENSIONS)}")
    t0 = time.perf_counter()
    shape_env = ShapeEnv()
    name = dim.key.rsplit(".", 1)[-1]
    sym = shape_env.create_symbol(dim.hint, _size_source(name), dynamic_dim=DimDynamic.DYNAMIC)
    k = shape_env.create_symintnode(sym, hint=dim.hint)  # an int where torch specialises (k = 1)
    value = k * dim.period if dim.period != 1 else k
    if dim.model_fields:
        spec = task.model
        task = replace(task, model=replace(spec, args=replace(
            spec.args, **{f: value for f in dim.model_fields})))
    inputs = StepInputs(shape_env=shape_env, memory_only=True,
                        batch=value if dim.key == "training.micro_batch" else None,
                        seq_len=value if dim.key == "training.seq_len" else None)
    with private_dispatch_cache():
        streams = run_rank_step(task, inputs)["streams"]
    subs = {sym: K} if isinstance(sym, sympy.Symbol) else {}

    def expr(v: Any) -> sympy.Expr:
        if isinstance(v, torch.SymInt):
            return sympy.sympify(v.node.expr).xreplace(subs)
        return sympy.Integer(int(v))

    memory = [MemoryEvent(e.phase, e.module, e.op, expr(e.delta), expr(e.saved_delta))
              for e in streams.memory]
    guards = [SizeGuard(g.expr.xreplace(subs), _where(g)) for g in shape_env.guards]
    k_range, specialised = _k_range(shape_env, sym, guards)
    training, par = task.training, task.parallel
    if par.pp > 1:
        span = (task.num_microbatches, task.num_microbatches)
    else:
        sync = grad_sync_rule(training.grad_sync, par.dp_replicate, par.dp_shard,
                              par.zero_stage, par.zero_overlap_grad_reduce)
        span = microbatch_span(task.num_microbatches, task.all_microbatches, sync.last_differs)
    return SymbolicTrace(rank=task.rank, dim=dim, memory=memory,
                         scalars={key: expr(v) for key, v in streams.scalars.items()},
                         guards=guards, k_range=k_range, microbatches=span,
                         specialised=specialised, wall_s=time.perf_counter() - t0)


def _finite(bound: Any) -> int | None:
    """An integer bound of a ShapeEnv value range; None for its infinities (int_oo, oo)."""
    bound = sympy.sympify(bound)
    return int(bound) if bound.is_Integer else None


def _where(guard: Any) -> str:
    loc = getattr(guard, "sloc", None)
    frame = getattr(loc, "maybe_user_loc", None) or getattr(loc, "framework_loc", None)
    if frame is None:
        return ""
    if isinstance(frame, str):
        return frame
    return f"{frame.filename}:{frame.lineno} ({frame.name})"


def _k_range(shape_env: ShapeEnv, sym: Any,
             guards: list[SizeGuard]) -> tuple[tuple, SizeGuard | None]:
    """k's range as the ShapeEnv left it, and the guard that pinned k to its hint, if one did
    (a hint of 1 is specialised by torch at creation: no guard, a concrete run)."""
    if not isinstance(sym, sympy.Symbol):
        return (int(sym), int(sym)), None
    fixed = shape_env.replacements.get(sym)
    vr = shape_env.var_to_range.get(sym)
    lo = _finite(vr.lower) if vr is not None else None
    hi = _finite(vr.upper) if vr is not None else None
    lo = 1 if lo is None else lo
    if fixed is not None and getattr(fixed, "is_number", False):
        lo = hi = int(fixed)
    if lo != hi:
        return (lo, hi), None
    pinning = [g for g in guards if isinstance(g.expr, sympy.Eq)] or guards
    return (lo, hi), pinning[0] if pinning else SizeGuard(sympy.Eq(K, lo), "the ShapeEnv")
