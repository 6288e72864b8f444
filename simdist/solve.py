"""`simdist fit CONFIG --solve training.micro_batch | training.seq_len`: the largest value of one
training dimension at which every rank class's peak memory fits `memory_limit_bytes`, from
executed code. (Not costmodel/fit.py, which fits calibration constants to GPU measurements.)

Method `symbolic` (mode/symbolic.py): every rank class's step is executed once with the
dimension a ShapeEnv size symbol k (the dimension is period x k; `period` is what the config's
rules make every valid value a multiple of: tp with sequence parallelism, 2 x cp), so every
allocation of its memory stream has a sympy expression. The class's peak is the maximum of its
candidate peaks — the live bytes after every allocation, a running sum of those expressions:
polynomials in k (linear in the micro-batch; in the sequence, quadratic where eager attention
materialises S x S scores). The maximum is kept as the candidates no other one dominates
coefficient-wise (the same for every k >= 0), and reported as the sympy Max of those that are
the maximum somewhere (string and LaTeX). It is exact for every k the run's guards admit (the
branches the code took on sizes) with the same micro-batch count structure and rank classes:
one execution answers every such value. Where a value lies outside (the count of micro-batches
changes with a fixed global_batch, k = 1 which torch specialises), another symbolic run is made
there: each run is a probe that covers a set of values.

Method `bisection`: where the step cannot run symbolically — an op whose output size depends on
data, a guard that fixes the symbol to its hint (MoE routing counts tokens), an error, the model's
parameters depending on the dimension (GPT's learned positions sized to training.seq_len), or
sizes that are not polynomial in k — each probe is a concrete simulation through the normal path
(planner.plan_run, then the memo protocol on Ray actors, as `simdist run`), covering one value;
`fit.json` says why (`fallback_reason`).

The search over probes assumes what every allocation's size makes true: the peak does not
decrease when the dimension grows (for a symbolic probe this is checked on its expressions:
`nondecreasing`). The answer is the largest valid value that fits with the next valid value
known not to fit (or the largest valid value). Valid means what the config's own rules accept
(config.load_config and validate.check_plan at that value: global_batch a multiple of dp x
micro_batch, tp dividing seq_len with sequence parallelism, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sympy

from simdist.config import (MICRO_BATCH_MAX, SEQ_LEN_MAX, ConfigError, SimdistConfig, load_config,
                            raw_config)
from simdist.trace import SIZE_SYMBOL, RankTask, SymbolicDim, SymbolicTrace

SOLVABLE = ("training.micro_batch", "training.seq_len")
FIT_FILE = "fit.json"
MAX_PROBES = 40  # bisection over 2^24 sequence lengths needs 24
SCAN_MAX = 4096  # candidate values checked against the config in one search for a valid value
K = sympy.Symbol(SIZE_SYMBOL, integer=True, positive=True)


def check_key(key: str) -> str:
    if key not in SOLVABLE:
        raise ConfigError("--solve", f"{key!r} cannot be solved for; allowed: "
                                     f"{', '.join(SOLVABLE)}")
    return key


class Fallback(Exception):
    """The step cannot be solved symbolically; the message says why."""


# ---------------------------------------------------------------------------------------------
# The values the config allows


@dataclass
class Space:
    """The valid values of the dimension: candidates (multiples of `period`, or the divisors
    of `divides`) accepted by the config at that value (load_config + check_plan)."""
    key: str
    raw: dict  # the config with --set applied, unvalidated
    trust_code: bool
    period: int
    upper: int
    divides: int | None
    rule: str
    use_cache: bool = True
    _configs: dict[int, Any] = field(default_factory=dict, repr=False)
    _plans: dict[int, Any] = field(default_factory=dict, repr=False)
    _divisors: list[int] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, raw: dict, key: str, base: SimdistConfig, trust_code: bool) -> Space:
        p, t = base.parallel, base.training
        section, name = key.split(".")
        if name == "micro_batch":
            fixed = (raw.get("training") or {}).get("global_batch") is not None
            if fixed:
                per = t.global_batch // base.dp
                return cls(key, raw, trust_code, 1, min(MICRO_BATCH_MAX, per), per,
                           f"divisors of training.global_batch / dp = {t.global_batch} / "
                           f"{base.dp} = {per} (global_batch is fixed by the config; the "
                           "micro-batch count per step follows)")
            return cls(key, raw, trust_code, 1, MICRO_BATCH_MAX, None,
                       f"every integer 1-{MICRO_BATCH_MAX:,} (global_batch is not set: it "
                       "follows as dp x micro_batch, one micro-batch per step)")
        parts, why = [], []
        if p.tp > 1 and p.sequence_parallel:
            parts.append(p.tp)
            why.append(f"parallel.tp = {p.tp} with sequence_parallel")
        if p.cp > 1:
            parts.append(2 * p.cp)
            why.append(f"2 x parallel.cp = {2 * p.cp}")
        period = math.lcm(*parts) if parts else 1
        upper = SEQ_LEN_MAX
        model = raw.get("model") or {}
        if "max_seq_len" in model and isinstance(model["max_seq_len"], int):
            upper = min(upper, model["max_seq_len"])
            why.append(f"at most model.max_seq_len = {model['max_seq_len']}")
        rule = (f"multiples of {period} ({'; '.join(why[:len(parts)])})" if period > 1
                else "every integer")
        rule += f" up to {upper:,}" + (f" ({why[-1]})" if upper != SEQ_LEN_MAX else "")
        return cls(key, raw, trust_code, period, upper, None, rule)

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.key.split(".")[1], integer=True, positive=True)

    def in_dimension(self, expr: Any) -> Any:
        """An expression in k rewritten in the dimension (k = dimension / period)."""
        return expr.xreplace({K: self.symbol / self.period if self.period != 1 else self.symbol})

    def with_value(self, v: int) -> dict:
        raw = {k: dict(s) if isinstance(s, dict) else s for k, s in self.raw.items()}
        section, name = self.key.split(".")
        raw[section] = {**(raw.get(section) or {}), name: v}
        return raw

    def config(self, v: int) -> SimdistConfig | ConfigError:
        if v not in self._configs:
            from simdist.planner import resolve_spec
            from simdist.validate import check_plan

            try:
                cfg = load_config(self.with_value(v), trust_code=self.trust_code)
                check_plan(cfg, resolve_spec(cfg))
            except ConfigError as e:
                self._configs[v] = e
            else:
                self._configs[v] = cfg
        return self._configs[v]

    def valid(self, v: int) -> bool:
        return 1 <= v <= self.upper and self._candidate(v) and \
            isinstance(self.config(v), SimdistConfig)

    def plan(self, v: int) -> Any:  # simdist.planner.RunPlan
        if v not in self._plans:
            from simdist.planner import plan_run

            cfg = self.config(v)
            if isinstance(cfg, ConfigError):
                raise cfg
            self._plans[v] = plan_run(cfg, use_cache=self.use_cache)
        return self._plans[v]

    def _candidate(self, v: int) -> bool:
        if self.divides is not None:
            return self.divides % v == 0
        return v % self.period == 0

    def _candidates(self, start: int, up: bool) -> Iterator[int]:
        """Candidates from `start` (inclusive) upwards or downwards, within 1..upper."""
        if self.divides is not None:
            if self._divisors is None:
                n = self.divides
                small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
                self._divisors = sorted(set(small + [n // d for d in small]))
            ds = [d for d in self._divisors if d <= self.upper]
            yield from (d for d in ds if d >= start) if up else (
                d for d in reversed(ds) if d <= start)
            return
        p = self.period
        v = -(-start // p) * p if up else start // p * p
        while 1 <= v <= self.upper:
            yield v
            v += p if up else -p

    def _scan(self, start: int, up: bool) -> int | None:
        for i, v in enumerate(self._candidates(start, up)):
            if i >= SCAN_MAX:
                return None
            if self.valid(v):
                return v
        return None

    def next_valid(self, v: int) -> int | None:
        """The smallest valid value > v."""
        return self._scan(v + 1, True)

    def prev_valid(self, v: int) -> int | None:
        """The largest valid value < v."""
        return self._scan(v - 1, False) if v > 1 else None

    def at_most(self, v: int) -> int | None:
        """The largest valid value <= v."""
        return self._scan(min(v, self.upper), False) if v >= 1 else None


# ---------------------------------------------------------------------------------------------
# Peak polynomials


def poly_of(expr: sympy.Expr) -> tuple[int, ...]:
    """Coefficients (of k^0, k^1, ...) of an integer polynomial in k; Fallback otherwise."""
    try:
        p = sympy.Poly(expr, K)
    except sympy.PolynomialError:
        raise Fallback(f"an allocation size is not a polynomial in the dimension: {expr}") from None
    if p.free_symbols - {K} or any(not c.is_Integer for c in p.all_coeffs()):
        raise Fallback(f"an allocation size is not an integer polynomial in the dimension: {expr}")
    return tuple(int(c) for c in reversed(p.all_coeffs()))


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n))


def _trim(p: tuple[int, ...]) -> tuple[int, ...]:
    p = list(p)
    while len(p) > 1 and p[-1] == 0:
        p.pop()
    return tuple(p)


def evaluate(p: tuple[int, ...], k: int) -> int:
    out = 0
    for c in reversed(p):
        out = out * k + c
    return out


def candidate_peaks(trace: SymbolicTrace) -> list[tuple[int, ...]]:
    """The live bytes at the start and after every allocation (summarize's peak is their
    maximum), as polynomials in k; the same expression once."""
    polys: dict[Any, tuple[int, ...]] = {}

    def poly(e: Any) -> tuple[int, ...]:
        if e not in polys:
            polys[e] = poly_of(e)
        return polys[e]

    live = poly(trace.scalars["initial_live"])
    out = {live}
    for ev in trace.memory:
        if ev.delta == 0:
            continue
        d = poly(ev.delta)
        live = _add(live, d)
        if any(c > 0 for c in d):
            out.add(_trim(live))
    return list(out)


def dominant(cands: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The candidates no other one dominates coefficient-wise (>= in every coefficient: >= at
    every k >= 0): their maximum is the maximum of all."""
    n = max(len(c) for c in cands)
    padded = sorted({c + (0,) * (n - len(c)) for c in cands}, key=lambda c: c[::-1], reverse=True)
    front: list[tuple[int, ...]] = []
    for c in padded:
        if not any(all(f[i] >= c[i] for i in range(n)) for f in front):
            front.append(c)
    return [_trim(f) for f in front]


def _roots(p: tuple[int, ...]) -> list[float]:
    p = _trim(p)
    if len(p) <= 1:
        return []
    if len(p) == 2:
        return [-p[0] / p[1]]
    import numpy as np

    return [r.real for r in np.roots(list(reversed(p))) if abs(r.imag) < 1e-9 * (1 + abs(r))]


def envelope(front: list[tuple[int, ...]], lo: int, hi: int) -> list[tuple[int, ...]]:
    """The polynomials of `front` that are the maximum at some integer k in [lo, hi]: the
    maximum can change only where two of them cross, so it is tested at the integers around
    every crossing, the one after each, and the ends (exact integer arithmetic)."""
    if len(front) == 1:
        return list(front)
    points = {lo, hi}
    for i, p in enumerate(front):
        for q in front[i + 1:]:
            for r in _roots(_add(p, tuple(-c for c in q))):
                if lo - 1 <= r <= hi + 1:
                    f = math.floor(r)
                    points.update(range(f - 1, f + 3))
    points = sorted(x for x in points if lo <= x <= hi)
    points = sorted(set(points) | {x + 1 for x in points if x + 1 <= hi})
    keep: list[tuple[int, ...]] = []
    for x in points:
        values = [evaluate(p, x) for p in front]
        top = max(values)
        for p, v in zip(front, values):
            if v == top and p not in keep:
                keep.append(p)
    return keep


def nondecreasing(p: tuple[int, ...], lo: int) -> bool:
    """p(k) <= p(k') for every real lo <= k <= k' (exact: the set where p' < 0 is empty)."""
    dp = [i * c for i, c in enumerate(p)][1:]
    if all(c >= 0 for c in dp):
        return True
    x = sympy.Symbol("x", real=True)
    negative = sympy.solveset(sum(c * x**i for i, c in enumerate(dp)) < 0, x,
                              sympy.Interval(lo, sympy.oo))
    return negative is sympy.S.EmptySet


def largest_within(front: list[tuple[int, ...]], limit: int, kmax: int) -> int:
    """The largest integer k in [1, kmax] with every polynomial <= limit, by bisection on their
    maximum (nondecreasing: see `nondecreasing`); 0 if k = 1 already exceeds it."""
    peak = lambda k: max(evaluate(p, k) for p in front)  # noqa: E731
    if peak(1) > limit:
        return 0
    lo, hi = 1, kmax
    if peak(hi) <= limit:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------
# Probes: what one execution tells about a set of values


@dataclass
class ClassCurve:
    """One rank class at the values a probe covers: symbolic (`front`: its candidate peaks,
    polynomials in k) or concrete (`peak` at the probe's value)."""
    class_id: int
    rank: int
    ranks: int
    front: list[tuple[int, ...]] | None = None
    shown: list[tuple[int, ...]] | None = None  # the envelope: the maximum somewhere
    peak: int | None = None
    nondecreasing: bool = True
    guards: list[Any] = field(default_factory=list)  # SizeGuard
    k_range: tuple[int, int | None] = (1, None)
    microbatches: tuple[int, int | None] = (1, None)

    def at(self, k: int) -> int:
        if self.front is None:
            assert self.peak is not None
            return self.peak
        return max(evaluate(p, k) for p in self.front)


@dataclass
class Probe:
    value: int
    method: str  # "symbolic" | "concrete"
    classes: list[ClassCurve]
    class_ranks: list[list[int]]
    wall_s: float

    def covers(self, space: Space, v: int) -> bool:
        """Every class's expressions hold at v: a multiple of the period in k's range, every
        guard true, the same micro-batch count structure and the same rank classes."""
        if v == self.value:
            return True
        if self.method != "symbolic" or not space.valid(v) or v % space.period:
            return False
        k = v // space.period
        for c in self.classes:
            lo, hi = c.k_range
            if k < lo or (hi is not None and k > hi):
                return False
            if not all(_holds(g.expr, k) for g in c.guards):
                return False
        cfg = space.config(v)
        n = cfg.num_microbatches
        for c in self.classes:
            lo, hi = c.microbatches
            if n < lo or (hi is not None and n > hi):
                return False
        return space.plan(v).classes == self.class_ranks

    def peaks(self, space: Space, v: int) -> list[int]:
        return [c.at(v // space.period) for c in self.classes]


def _holds(guard: Any, k: int) -> bool:
    """The guard at k (one that does not evaluate to true or false at k does not hold)."""
    value = guard.xreplace({K: k})
    return value is sympy.true or value is True


def symbolic_probe(traces: list[SymbolicTrace], run: Any, value: int, space: Space,
                   wall_s: float) -> Probe:
    """A Probe from each class's symbolic trace; Fallback where the traces cannot be solved."""
    kmax = space.upper // space.period
    curves = []
    for cid, (ranks, tr) in enumerate(zip(run.classes, traces)):
        if tr.specialised is not None and tr.dim.hint >= 2:
            g = tr.specialised
            raise Fallback(f"the {space.key.split('.')[1]} symbol was fixed to its value "
                           f"{value} by the guard {space.in_dimension(g.expr)} at {g.where}")
        front = dominant(candidate_peaks(tr))
        lo = tr.k_range[0]
        hi = min(kmax, tr.k_range[1] if tr.k_range[1] is not None else kmax)
        mono = all(nondecreasing(p, lo) for p in front)
        curves.append(ClassCurve(cid, ranks[0], len(ranks), front,
                                 envelope(front, lo, max(lo, hi)), nondecreasing=mono,
                                 guards=tr.guards, k_range=tr.k_range,
                                 microbatches=tr.microbatches))
    return Probe(value, "symbolic", curves, run.classes, wall_s)


# ---------------------------------------------------------------------------------------------
# Where probes run


class Runner(Protocol):
    async def symbolic(self, tasks: list[RankTask], dims: list[SymbolicDim]) -> list[SymbolicTrace]: ...
    async def concrete(self, run: Any) -> list[int]: ...
    async def close(self) -> None: ...


class LocalRunner:
    """Probes in this process, one rank after another (tests; `in_process=True`)."""

    def __init__(self) -> None:
        from simdist.workers.local import LocalPool

        self.pool = LocalPool()

    async def symbolic(self, tasks: list[RankTask], dims: list[SymbolicDim]) -> list[SymbolicTrace]:
        return [await self.pool.symbolic(t, d) for t, d in zip(tasks, dims)]

    async def concrete(self, run: Any) -> list[int]:
        from simdist.memo import open_memo, simulate_task

        return [(await simulate_task(self.pool, t, open_memo(t))).peak_bytes for t in run.tasks]

    async def close(self) -> None:
        return None


class RayRunner:
    """Probes on Ray actors (inside the caller's ray_session): symbolic classes side by side on
    a pool kept for the whole fit; concrete probes as `simdist run` simulates (coordinator)."""

    def __init__(self, address: str | None, workers: int | str | None, use_cache: bool,
                 timeout_s: float) -> None:
        self.address, self.workers, self.use_cache = address, workers, use_cache
        self.timeout_s = timeout_s
        self.pool: Any = None

    async def symbolic(self, tasks: list[RankTask], dims: list[SymbolicDim]) -> list[SymbolicTrace]:
        from simdist.workers.pool import ActorPool, pool_size, start_workers

        if self.pool is None:
            self.pool = ActorPool(start_workers(pool_size(self.workers or "auto", len(tasks))),
                                  self.timeout_s)
        return list(await asyncio.gather(*(self.pool.symbolic(t, d)
                                           for t, d in zip(tasks, dims))))

    async def concrete(self, run: Any) -> list[int]:
        from simdist.coordinator import simulate_async

        await self.close()  # its CPUs to the run's own actors
        plan = await simulate_async(run, address=self.address, workers=self.workers,
                                    use_cache=self.use_cache)
        peaks = [0] * len(run.classes)
        for cid, peak in zip(plan.ranks["class_id"].to_pylist(),
                             plan.ranks["peak_bytes"].to_pylist()):
            peaks[cid] = max(peaks[cid], peak)
        return peaks

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


# ---------------------------------------------------------------------------------------------
# The solver


@dataclass
class FitResult:
    out: Path | None
    data: dict  # fit.json


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"simdist fit: {text}", file=sys.stderr, flush=True)


def model_fields_following(space: Space, a: int, b: int) -> tuple[str, ...]:
    """Fields of the model's arguments that change with the dimension, each equal to it (Llama's
    max_seq_len, sized to training.seq_len): executed as the symbol too. Fallback where the
    model changes otherwise, or where such a field sizes a parameter or buffer (GPT's learned
    position table): its FSDP shards and optimizer state would be symbolic."""
    from simdist.families import build_model
    from simdist.planner import resolve_spec

    spec_a, spec_b = resolve_spec(space.config(a)), resolve_spec(space.config(b))
    if spec_a == spec_b:
        return ()
    name = space.key.split(".")[1]
    if not dataclasses.is_dataclass(spec_a.args) or spec_a.family != spec_b.family:
        raise Fallback(f"the model changes with {space.key}")
    fields = [f.name for f in dataclasses.fields(spec_a.args)
              if getattr(spec_a.args, f.name) != getattr(spec_b.args, f.name)]
    for f in fields:
        if (getattr(spec_a.args, f), getattr(spec_b.args, f)) != (a, b):
            raise Fallback(f"model.{f} changes with {space.key} ({getattr(spec_a.args, f)} at "
                           f"{name} = {a}, {getattr(spec_b.args, f)} at {b})")

    def shapes(spec: Any) -> dict[str, tuple]:
        m = build_model(spec, "meta")
        return {n: tuple(t.shape) for n, t in [*m.named_parameters(), *m.named_buffers()]}

    sa, sb = shapes(spec_a), shapes(spec_b)
    for n in sa:
        if sa[n] != sb.get(n):
            raise Fallback(f"the model's {n} is {list(sa[n])} at {name} = {a} and "
                           f"{list(sb.get(n, ()))} at {b}: model.{fields[0]} is sized to "
                           f"{space.key} and sizes a parameter, which FSDP shards and the "
                           f"optimizer keeps (set model.{fields[0]} to solve it symbolically)")
    return tuple(fields)


async def solve(space: Space, runner: Runner, *, progress: bool = False) -> dict:
    """Probe until the largest fitting valid value is known (see the module docstring);
    returns fit.json's data."""
    t0 = time.perf_counter()
    base_value = getattr(load_config(space.raw, trust_code=space.trust_code).training,
                         space.key.split(".")[1])
    first = base_value
    if first == space.period and space.valid(2 * space.period):
        first = 2 * space.period  # k >= 2: at k = 1 torch specialises the symbol
    limit = space.plan(first).memory_limit_bytes
    reason = None
    fields: tuple[str, ...] = ()
    try:
        nxt = space.next_valid(first) or space.prev_valid(first)
        fields = model_fields_following(space, first, nxt) if nxt else ()
        result = await _search(space, runner, "symbolic", first, limit, fields, progress)
    except Fallback as e:
        reason = str(e)
        _say(progress, f"cannot solve symbolically ({reason}); bisecting over concrete runs")
        result = await _search(space, runner, "concrete", base_value, limit, (), progress)
    finally:
        await runner.close()
    data = _report(space, result, limit, reason, fields)
    data["wall_s"] = time.perf_counter() - t0
    return data


@dataclass
class _Search:
    probes: list[Probe]
    known: dict[int, tuple[list[int], Probe]]  # value -> (peak per class, the probe that knows)
    lo: int | None
    hi: int | None
    warnings: list[str]


async def _search(space: Space, runner: Runner, method: str, first: int, limit: int,
                  fields: tuple[str, ...], progress: bool) -> _Search:
    probes: list[Probe] = []
    known: dict[int, tuple[list[int], Probe]] = {}
    warnings: list[str] = []
    estimate: list[int] = []
    name = space.key.split(".")[1]

    def learn(probe: Probe, values: list[int | None]) -> None:
        for v in values:
            if v is not None and v not in known and probe.covers(space, v):
                known[v] = (probe.peaks(space, v), probe)

    def bounds() -> tuple[int | None, int | None]:
        fails = [v for v, (peaks, _) in known.items() if max(peaks) > limit]
        hi = min(fails) if fails else None
        fit = [v for v, (peaks, _) in known.items() if max(peaks) <= limit]
        if hi is not None and any(v > hi for v in fit):
            w = (f"the peak is not monotone in {name}: {max(fit)} fits, {hi} does not; the "
                 f"answer is the largest value below the smallest that does not fit")
            if w not in warnings:
                warnings.append(w)
        lo = max((v for v in fit if hi is None or v < hi), default=None)
        return lo, hi

    v: int | None = first
    while True:
        if len(probes) >= MAX_PROBES:
            raise RuntimeError(f"no answer after {MAX_PROBES} probes")
        assert v is not None
        run = space.plan(v)
        t0 = time.perf_counter()
        if method == "symbolic":
            _say(progress, f"symbolic run at {name} = {v} ({len(run.tasks)} rank class(es))")
            dims = [SymbolicDim(space.key, v // space.period, space.period, fields)
                    for _ in run.tasks]
            try:
                traces = await runner.symbolic(run.tasks, dims)
            except Exception as e:  # noqa: BLE001 - the model cannot run symbolically
                from simdist.errors import one_line

                raise Fallback(f"the symbolic run at {name} = {v} failed: {one_line(e)}") from e
            probe = symbolic_probe(traces, run, v, space, time.perf_counter() - t0)
            kmax = space.upper // space.period
            x = min(largest_within(c.front, limit, kmax) for c in probe.classes)
            est = space.at_most(x * space.period) if x >= 1 else None
            estimate = [e for e in (est, space.next_valid(est) if est else space.next_valid(0))
                        if e is not None]
            if not all(c.nondecreasing for c in probe.classes):
                warnings.append(f"a candidate peak of the symbolic run at {name} = {v} decreases "
                                f"as {name} grows")
        else:
            _say(progress, f"simulating {name} = {v} ({len(run.tasks)} rank class(es))")
            peaks = await runner.concrete(run)
            probe = Probe(v, "concrete",
                          [ClassCurve(cid, ranks[0], len(ranks), peak=p)
                           for cid, (ranks, p) in enumerate(zip(run.classes, peaks))],
                          run.classes, time.perf_counter() - t0)
            estimate = []
        probes.append(probe)
        learn(probe, [v, *estimate])
        lo, hi = bounds()
        # Around the answer: both sides from the same probe where it covers them.
        if lo is not None:
            learn(probe, [space.next_valid(lo)])
        lo, hi = bounds()
        if _done(space, lo, hi):
            return _Search(probes, known, lo, hi, warnings)
        v = _next_probe(space, lo, hi, estimate, known)


def _done(space: Space, lo: int | None, hi: int | None) -> bool:
    if lo is not None and hi is not None:
        return space.next_valid(lo) == hi
    if lo is None and hi is not None:
        return space.prev_valid(hi) is None
    if lo is not None:
        return space.next_valid(lo) is None
    return False


def _next_probe(space: Space, lo: int | None, hi: int | None, estimate: list[int],
                known: dict) -> int:
    inside = lambda v: (v is not None and v not in known and (lo is None or v > lo)  # noqa: E731
                        and (hi is None or v < hi))
    for e in estimate:
        if inside(e):
            return e
    if lo is not None and hi is not None:
        c = space.at_most((lo + hi) // 2)
        return c if inside(c) else space.next_valid(lo)
    if lo is not None:  # everything known fits: go up
        c = space.at_most(max(2 * lo, lo + 1))
        return c if inside(c) else space.next_valid(lo)
    assert hi is not None  # nothing known fits: go down
    c = space.at_most(hi // 2)
    if inside(c):
        return c
    c = space.next_valid(0)
    return c if inside(c) else space.prev_valid(hi)


# ---------------------------------------------------------------------------------------------
# fit.json


def _dim_expr(p: tuple[int, ...], d: sympy.Symbol, period: int) -> sympy.Expr:
    k = d / period if period != 1 else d
    return sympy.expand(sum(sympy.Integer(c) * k**i for i, c in enumerate(p)))


def _latex(expr: sympy.Expr, d: sympy.Symbol) -> str:
    return sympy.latex(expr, symbol_names={d: r"\mathrm{" + d.name.replace("_", r"\_") + "}"})


def _class_entry(space: Space, curve: ClassCurve, probe: Probe,
                 peaks: dict[str, int | None]) -> dict:
    """A class of the probe the answer comes from: its peak expression (symbolic) and its peak
    at the answer and the next valid value (where known)."""
    entry: dict[str, Any] = dict(class_id=curve.class_id, rank=curve.rank, ranks=curve.ranks,
                                 **peaks)
    if curve.front is not None:
        d = space.symbol
        shown = curve.shown or curve.front
        expr = sympy.Max(*[_dim_expr(p, d, space.period) for p in shown])
        lo, hi = curve.k_range
        entry.update(
            peak_expression=str(expr), peak_latex=_latex(expr, d),
            candidate_peaks=len(curve.front),
            expression_valid_for=dict(
                values=f"multiples of {space.period}" if space.period > 1 else "integers",
                lowest=lo * space.period, highest=hi * space.period if hi is not None else None,
                guards=[str(space.in_dimension(g.expr)) for g in curve.guards],
                microbatches_per_step=list(curve.microbatches), probe_value=probe.value),
            nondecreasing=curve.nondecreasing)
    return entry


def _report(space: Space, s: _Search, limit: int, reason: str | None,
            fields: tuple[str, ...]) -> dict:
    name = space.key.split(".")[1]
    method = "bisection" if reason is not None else "symbolic"
    answer = s.lo
    nxt = space.next_valid(answer) if answer is not None else s.hi

    def point(v: int | None) -> dict | None:
        if v is None:
            return None
        entry: dict[str, Any] = dict(value=v, valid=space.valid(v))
        if not entry["valid"]:
            cfg = space.config(v) if 1 <= v <= space.upper else None
            entry["invalid_because"] = (str(cfg) if isinstance(cfg, ConfigError) else
                                        f"not one of the valid values: {space.rule}")
        hit = s.known.get(v)
        if hit is None:
            for p in s.probes:
                if p.method == "symbolic" and v % space.period == 0 and entry["valid"] \
                        and p.covers(space, v):
                    hit = (p.peaks(space, v), p)
                    break
        if hit is not None:
            peaks, p = hit
            entry.update(peak_bytes=max(peaks), fits=max(peaks) <= limit,
                         peak_bytes_per_class=peaks, from_probe=p.value, method=p.method)
        return entry

    binding_probe = s.known[answer][1] if answer is not None else s.known[s.hi][1]
    binding = None
    if nxt is not None and nxt in s.known:
        peaks = s.known[nxt][0]
        binding = max(range(len(peaks)), key=lambda i: (peaks[i], -i))
    elif answer is not None:
        peaks = s.known[answer][0]
        binding = max(range(len(peaks)), key=lambda i: (peaks[i], -i))
    checks = [point(answer), point(answer + 1) if answer is not None else None]
    if nxt is not None and (answer is None or nxt != answer + 1):
        checks.append(point(nxt))
    data: dict[str, Any] = dict(
        dimension=space.key, max_value=answer, method=method, fallback_reason=reason,
        memory_limit_bytes=limit, binding_class=binding,
        valid_values=space.rule,
        next_valid_value=nxt,
    )
    if answer is None:
        peaks = s.known[s.hi][0]
        data["reason"] = (f"even the smallest valid value, {name} = {s.hi}, does not fit: peak "
                          f"{max(peaks)} bytes > memory_limit_bytes {limit}")
    elif nxt is None:
        data["reason"] = (f"every valid value fits up to the largest the config allows, "
                          f"{name} = {answer} ({space.rule})")
    # Did the config's rules, not memory, stop the answer short?
    if method == "symbolic" and answer is not None:
        p = s.known[answer][1]
        if p.method == "symbolic":
            kmax = space.upper // space.period
            x = min(largest_within(c.front, limit, kmax) for c in p.classes) * space.period
            if x > answer:
                data["validity"] = dict(
                    constrained=True, largest_fitting_by_expression=x,
                    note=(f"by its peak expression {name} = {x} would fit, but the valid values "
                          f"are {space.rule}; {answer} is the largest valid one that fits"
                          + (f" ({nxt} is the next)" if nxt else "")))
            else:
                data["validity"] = dict(constrained=False, largest_fitting_by_expression=x)
    def class_peak(v: int | None, i: int) -> int | None:
        hit = s.known.get(v) if v is not None else None
        return hit[0][i] if hit is not None and hit[1] is binding_probe else None

    data["classes"] = [_class_entry(space, c, binding_probe, dict(
        peak_at_max_value=class_peak(answer, i), peak_at_next_value=class_peak(nxt, i)))
        for i, c in enumerate(binding_probe.classes)]
    if fields:
        data["model_fields_symbolic"] = [f"model.{f}" for f in fields]
    data["check"] = [c for c in checks if c is not None]
    data["probes"] = [dict(value=p.value, method=p.method, wall_s=round(p.wall_s, 3),
                           peak_bytes_per_class=p.peaks(space, p.value))
                      for p in s.probes]
    if s.warnings:
        data["warnings"] = s.warnings
    return data


# ---------------------------------------------------------------------------------------------
# The command


def run_fit(config: str | Path | dict, key: str, overrides: list[str] = (),
            out: Path | None = None, *, address: str | None = None,
            workers: int | str | None = None, use_cache: bool = True, trust_code: bool = False,
            progress: bool = False, in_process: bool = False) -> FitResult:
    """Solve and write `out/fit.json` atomically (out already checked by rundir.check_out;
    None: nothing written). `in_process`: probes run in this process, without Ray."""
    import simdist

    check_key(key)
    raw = raw_config(config, overrides)
    base = load_config(raw, trust_code=trust_code)
    from simdist.planner import plan_run

    plan_run(base, use_cache=use_cache)  # the config as given must plan (exit 2 before running)
    space = Space.of(raw, key, base, trust_code)
    space.use_cache = use_cache

    async def go(runner: Runner) -> dict:
        return await solve(space, runner, progress=progress)

    if in_process:
        data = asyncio.run(go(LocalRunner()))
    else:
        from simdist.coordinator import ray_session

        with ray_session(address):
            data = asyncio.run(go(RayRunner(address, workers, use_cache,
                                            base.simulation.rank_timeout_s)))
    data = dict(simdist_version=simdist.__version__, kind="fit",
                config=str(config) if not isinstance(config, dict) else None,
                overrides=list(overrides), **data)
    import torch

    data["torch_version"] = torch.__version__
    if out is not None:
        from simdist.rundir import install, staging_dir

        tmp = staging_dir(out)
        try:
            (tmp / FIT_FILE).write_text(json.dumps(data, indent=2, default=str) + "\n")
            install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return FitResult(out, data)


def summary_lines(data: dict) -> list[str]:
    """What `simdist fit` prints: the answer, then each class's peak expression."""
    lines = [summary_line(data)]
    for c in data["classes"]:
        if "peak_expression" in c:
            lines.append(f"  class {c['class_id']} ({c['ranks']} rank(s)): peak bytes = "
                         f"{c['peak_expression']}")
    if data.get("fallback_reason"):
        lines.append(f"  bisection: {data['fallback_reason']}")
    return lines


def summary_line(data: dict) -> str:
    name = data["dimension"].split(".")[1]
    gib = 2**30
    if data["max_value"] is None:
        return f"{data['dimension']}: none fits ({data['method']}): {data['reason']}"
    checks = {c["value"]: c for c in data["check"]}
    at = checks.get(data["max_value"], {})
    text = (f"max {name} = {data['max_value']} ({data['method']})  peak "
            f"{at.get('peak_bytes', 0) / gib:.3f} GiB of {data['memory_limit_bytes'] / gib:.3f}")
    nxt = data.get("next_valid_value")
    if nxt is not None and nxt in checks and "peak_bytes" in checks[nxt]:
        text += f"; {name} = {nxt}: {checks[nxt]['peak_bytes'] / gib:.3f} GiB"
    if data.get("binding_class") is not None:
        text += f"  binding class {data['binding_class']}"
    return text
