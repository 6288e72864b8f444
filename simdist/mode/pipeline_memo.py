"""The pipeline memo: a rank's pipeline step for N micro-batches rebuilt from its step executed
with a few (n_a and n_b), so that a pipeline plan's simulation cost stops growing with N.

Why this is exact, and how it is checked. A schedule step is a prologue (the batch, the
schedule's receive buffers: one per micro-batch), the rank's actions in the schedule's order
(mode/pipeline_order.py: the real schedule object's order for any count, computed without
running) and an epilogue (gradient scaling, the optimizer step, the buffers the schedule frees
at its end). The streams are cut at the actions (the boundaries mode/pipeline.py records:
compute actions' begin / end; for the runtime schedules every action of the lowered order,
sends, receives, FSDP unshard / reshard and gradient reductions included). Each cut is an
action's *unit*: for the runtime schedules the action itself; for GPipe and 1F1B, whose code
runs the sends and receives between the compute actions, the action with the communication and
loss since the previous one.

A unit's events depend on what the unit is, not on where it stands: its kind and stage, whether
its micro-batch is the first or last (gradients created vs accumulated, the last backward's
gradient sync), for the runtime schedules whether it is the stage's first compute since an
unshard and, for zero bubble's split backward, whether weight gradients wait to be accumulated
(`unit_keys`), and for GPipe / 1F1B the previous action (which communication the code runs
before it, which of its tensors the code releases). That is the unit's key. The executed counts
are the smallest the schedule accepts whose units have every key of N (`memo_counts`). Normalised (its micro-batch index in its marks; a kernel wait on an
event of another unit by that unit's identity: "the receive of my micro-batch", "the latest
unshard of my stage"), every unit with one key must be identical in a run — the in-run proof.
Integers that grow with the micro-batch count (the whole batch's bytes, saved once by the first
forward; the per-micro-batch buffers of the prologue and epilogue) are fitted from the two runs
as a + b·n. The model must reproduce both executed runs exactly; then N is composed by walking
the schedule's order for N and re-resolving the waits. The protocol (simdist/memo.py) also
executes a longer count and requires the composition to equal it event for event before it
keeps the model; anything else falls back to full execution.
"""

from __future__ import annotations

import bisect
import difflib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from simdist.mode.pipeline_order import COMPUTE, Act, action_order, is_runtime
from simdist.trace import SCALARS, STREAMS, RankTask, StepStreams, named_event

FORMAT = 1


class FitError(Exception):
    """The executed steps are not of the form the memo rebuilds."""


# --- what the memo rebuilds ----------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineShape:
    """A rank's schedule: enough to compute its action order for any micro-batch count."""
    schedule: str
    pp: int
    num_stages: int
    pp_rank: int

    @classmethod
    def of(cls, task: RankTask) -> PipelineShape:
        """`task`'s schedule (a pipelined task)."""
        par = task.parallel
        return cls(par.pp_schedule, par.pp, par.stages, task.layout.coords(task.rank)["pp"])

    def order(self, n: int) -> tuple[Act, ...] | None:
        return action_order(self.schedule, self.pp, self.num_stages, self.pp_rank, n)

    @property
    def runtime(self) -> bool:
        return is_runtime(self.schedule)


def _flags(a: Act, n: int) -> tuple | None:
    return None if a.mb is None else (a.mb == 0, a.mb == n - 1)


def unit_keys(shape: PipelineShape, order: tuple[Act, ...], n: int) -> list[tuple]:
    """The key of every unit of `order` (see the module docstring)."""
    keys: list[tuple] = []
    if shape.runtime:
        fresh: set[int] = set()  # stages unsharded since their last compute action
        waiting: set[int] = set()  # stages with a W since their last I
        accumulated: set[int] = set()  # stages whose I accumulated W gradients before
        for a in order:
            if a.kind == "UNSHARD":
                fresh.add(a.stage)
            key: tuple = (a.kind, a.stage, _flags(a, n), a.kind in COMPUTE and a.stage in fresh)
            # zero bubble: a W leaves its weight gradients on the unsharded parameters (created,
            # or added to those of a W since the stage's last I); the next I accumulates them
            # (FSDP's post-backward, which the input-gradient pass reaches): created the first
            # time, added after
            if a.kind == "I":
                pending = a.stage in waiting
                key += (pending, pending and a.stage not in accumulated)
                if pending:
                    accumulated.add(a.stage)
                waiting.discard(a.stage)
            elif a.kind == "W":
                key += (a.stage in waiting,)
                waiting.add(a.stage)
            if a.kind in COMPUTE:
                fresh.discard(a.stage)
            keys.append(key)
        return keys
    for i, a in enumerate(order):
        prev = order[i - 1] if i else None
        keys.append((a.kind, a.stage, _flags(a, n),
                     None if prev is None else (prev.kind, prev.stage, _flags(prev, n))))
    return keys


@dataclass(frozen=True)
class MemoCounts:
    """The micro-batch counts the memo executes: two to fit, one longer to verify."""
    fit: tuple[int, int]
    verify: int

    def all(self) -> tuple[int, ...]:
        return (*self.fit, self.verify)


# What starting one more execution costs, in micro-batches of a small model's pipeline step
# (building, parallelising and materialising the model; benchmarks/README.md, pipeline memo).
EXECUTION_COST_MICROBATCHES = 2


def memo_counts(shape: PipelineShape, n: int) -> MemoCounts | None:
    """The counts to execute for `n` micro-batches: the smallest ones the schedule accepts whose
    units have every key `n` has; None where executing them would cost as much as executing
    `n` (then `n` is executed in full)."""
    order = shape.order(n)
    if order is None:
        return None
    need = set(unit_keys(shape, order, n))
    wanted = 3  # two to fit, one to verify
    budget = n - EXECUTION_COST_MICROBATCHES * (wanted - 1)  # the counts must sum below it
    found: list[int] = []
    fitted: set | None = None  # the keys both fitting counts have
    m = 0
    while len(found) < wanted:
        m += 1
        if sum(found) + m * (wanted - len(found)) >= budget:
            return None
        o = shape.order(m)
        if o is None:
            continue
        keys = set(unit_keys(shape, o, m))
        # the verifying count: nothing the model has not fitted
        if need <= keys and (len(found) < 2 or keys <= fitted):
            found.append(m)
            fitted = keys if fitted is None else fitted & keys
    return MemoCounts((found[0], found[1]), found[2])


# --- values that grow with the micro-batch count -------------------------------------------------

class Lin(NamedTuple):
    """An integer a + b·n of the micro-batch count n."""
    a: int
    b: int


def _merge(x: Any, y: Any, nx: int, ny: int) -> Any:
    """One structure for `x` (at nx micro-batches) and `y` (at ny): equal parts kept, integers
    that differ as Lin; FitError where they differ otherwise."""
    if x == y:
        return x
    if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) \
            and not isinstance(x, Ref):
        merged = tuple(_merge(u, v, nx, ny) for u, v in zip(x, y))
        return type(x)(*merged) if hasattr(x, "_fields") else merged
    if type(x) is int and type(y) is int:
        b, rem = divmod(y - x, ny - nx)
        if rem:
            raise FitError(f"{x} at {nx}, {y} at {ny}: not linear in the micro-batch count")
        return Lin(x - b * nx, b)
    raise FitError(f"{x!r} at {nx} differs from {y!r} at {ny}")


def _has_lin(x: Any) -> bool:
    if isinstance(x, Lin):
        return True
    return isinstance(x, tuple) and any(_has_lin(v) for v in x)


def _at(x: Any, n: int) -> Any:
    if isinstance(x, Lin):
        return x.a + x.b * n
    if isinstance(x, tuple) and not isinstance(x, Ref):
        values = tuple(_at(v, n) for v in x)
        return type(x)(*values) if hasattr(x, "_fields") else values
    return x


def _mask(x: Any) -> Any:
    """`x` with its integers blanked: events that may differ only by a Lin align."""
    if type(x) is int:
        return 0
    if isinstance(x, tuple):
        return tuple(_mask(v) for v in x)
    return x


# --- cutting executed streams --------------------------------------------------------------------

class Ref(NamedTuple):
    """A kernel wait on an event of another unit, by that unit's identity: its kind and stage,
    its micro-batch (`base` "own": the waiting unit's + `off`; "n": the count + `off`; "zero":
    `off`; "latest": the latest such unit before the waiting one, for actions of no micro-batch)
    and the awaited event's index in it; or (`base` "pro") an event of the prologue, `off`
    events before its end."""
    kind: str
    stage: int
    base: str
    off: int
    index: int


_POS = ("kernels", "memory", "ops", "collectives")


@dataclass
class _Cut:
    """Start positions (kernels, memory, ops, collectives) of the prologue's end / every unit,
    and of the epilogue."""
    starts: list[tuple[int, int, int, int]]
    end: tuple[int, int, int, int]


def _cut(streams: StepStreams, order: tuple[Act, ...], runtime: bool) -> _Cut:
    b = streams.boundaries
    if runtime:
        enters = [x for x in b if x.label.startswith("enter PP:")]
        exits = [x for x in b if x.label.startswith("exit PP:")]
        if not exits or [x.label[len("enter PP:"):] for x in enters] != [a.label() for a in order]:
            raise FitError("the executed actions are not the schedule's order")
        points = [(x.kernels, x.memory) for x in enters] + [(exits[-1].kernels, exits[-1].memory)]
    else:
        begins = [x for x in b if x.label.startswith("begin ")]
        ends = [x for x in b if x.label.startswith("end ")]
        if not begins or len(ends) != len(order) or ([x.label.split()[1:] for x in begins]
                                                      != [[a.kind, str(a.stage), str(a.mb)]
                                                          for a in order]):
            raise FitError("the executed actions are not the schedule's order")
        # a unit: the communication since the previous action's end, then the action (its end
        # mark included)
        points = [(begins[0].kernels, begins[0].memory)] + [(e.kernels + 1, e.memory) for e in ends]
    ops_at, colls_at = [0], [0]
    for e in streams.kernels:
        ops_at.append(ops_at[-1] + (e.kind == "op"))
        colls_at.append(colls_at[-1] + (e.kind == "coll"))
    pos = [(k, m, ops_at[k], colls_at[k]) for k, m in points]
    return _Cut(pos[:-1], pos[-1])


def _slice(streams: StepStreams, start: tuple, stop: tuple) -> dict[str, tuple]:
    return {name: tuple(getattr(streams, name)[a:z]) for name, a, z in zip(_POS, start, stop)}


def _wait_targets(kernels: list) -> list[int]:
    """The index of the event each kernel event waits for (-1: none or a join)."""
    seen: dict[tuple, list[int]] = {}
    out = []
    for i, e in enumerate(kernels):
        out.append(seen[(e.wait_module, e.wait_stream)][-e.wait_back] if e.wait_back > 0 else -1)
        seen.setdefault((e.module, e.stream), []).append(i)
    return out


def _ref(target_unit: Act, target_index: int, waiting: Act | None, n: int) -> Ref:
    t = target_unit
    if t.mb is None:
        return Ref(t.kind, t.stage, "latest", 0, target_index)
    if waiting is not None and waiting.mb is not None:
        return Ref(t.kind, t.stage, "own", t.mb - waiting.mb, target_index)
    if t.mb == 0:
        return Ref(t.kind, t.stage, "zero", 0, target_index)
    return Ref(t.kind, t.stage, "n", t.mb - n, target_index)


@dataclass
class _Run:
    """One executed step, cut and normalised."""
    n: int
    prologue: dict[str, tuple]
    epilogue: dict[str, tuple]
    units: dict[tuple, dict[str, tuple]]  # key -> template
    scalars: dict[str, int]


def _normalise(streams: StepStreams, shape: PipelineShape, n: int) -> _Run:
    order = shape.order(n)
    if order is None:
        raise FitError(f"the schedule does not accept {n} micro-batches")
    cut = _cut(streams, order, shape.runtime)
    targets = _wait_targets(streams.kernels)
    unit_start = [s[0] for s in cut.starts]
    prologue_end = unit_start[0] if unit_start else cut.end[0]

    def owner(k: int) -> int:  # the unit holding kernel event k (-1: the prologue)
        return bisect.bisect_right(unit_start, k) - 1

    def kernels_of(start: int, stop: int, act: Act | None) -> tuple:
        out = []
        for k in range(start, stop):
            e = streams.kernels[k]
            if e.kind == "mark":
                kind, stage, mb = e.label.split()[1:]
                if act is None or (kind, int(stage), int(mb)) != (act.kind, act.stage, act.mb):
                    raise FitError(f"mark {e.label!r} in the unit of {act}")
                e = e._replace(label=e.label.rpartition(" ")[0] + " *")
            t = targets[k]
            if 0 <= t < start:
                u = owner(t)
                e = e._replace(wait_back=Ref("", -1, "pro", t - prologue_end, 0) if u < 0
                               else _ref(order[u], t - unit_start[u], act, n))
            out.append(e)
        return tuple(out)

    keys = unit_keys(shape, order, n)
    units: dict[tuple, dict[str, tuple]] = {}
    bounds = cut.starts + [cut.end]
    for i, (a, key) in enumerate(zip(order, keys)):
        part = _slice(streams, bounds[i], bounds[i + 1])
        part["kernels"] = kernels_of(bounds[i][0], bounds[i + 1][0], a)
        seen = units.setdefault(key, part)
        if seen is not part and seen != part:
            raise FitError(f"two units of key {key} differ (at {a.label()})")
    end = (len(streams.kernels), len(streams.memory), len(streams.ops), len(streams.collectives))
    epilogue = _slice(streams, cut.end, end)
    epilogue["kernels"] = kernels_of(cut.end[0], end[0], None)
    prologue = _slice(streams, (0, 0, 0, 0), cut.starts[0] if cut.starts else cut.end)
    return _Run(n, prologue, epilogue, units, dict(streams.scalars))


# --- prologue and epilogue: fixed events, per-micro-batch blocks, Lin values ---------------------

class Piece(NamedTuple):
    """Part of a prologue / epilogue stream: `events` once, or (`repeat`) n - n_a copies of
    them (a block of one micro-batch, beyond the n_a the fitted events hold)."""
    events: tuple
    repeat: bool


def _fit_pieces(x: tuple, y: tuple, nx: int, ny: int) -> list[Piece]:
    """Pieces that give `x` at nx micro-batches and `y` at ny."""
    d = ny - nx
    pieces: list[Piece] = []

    def inserted(block: tuple) -> None:
        size, rem = divmod(len(block), d)
        one = block[:size]
        if rem or block != one * d:
            raise FitError("events added per micro-batch are not one block repeated")
        pieces.append(Piece(one, True))

    matcher = difflib.SequenceMatcher(None, x, y, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pieces.append(Piece(x[i1:i2], False))
        elif tag == "insert":
            inserted(y[j1:j2])
        elif tag == "replace":
            # events that differ by values of the count, maybe next to added ones
            inner = difflib.SequenceMatcher(None, [_mask(e) for e in x[i1:i2]],
                                            [_mask(e) for e in y[j1:j2]], autojunk=False)
            for t2, a1, a2, b1, b2 in inner.get_opcodes():
                if t2 == "equal":
                    pieces.append(Piece(tuple(_merge(u, v, nx, ny) for u, v in
                                              zip(x[i1 + a1:i1 + a2], y[j1 + b1:j1 + b2])),
                                        False))
                elif t2 == "insert":
                    inserted(y[j1 + b1:j1 + b2])
                else:
                    raise FitError(f"{t2} of events between {nx} and {ny} micro-batches")
        else:
            raise FitError(f"{tag} of events between {nx} and {ny} micro-batches")
    return pieces


def _pieces_at(pieces: list[Piece], n0: int, n: int) -> list:
    out: list = []
    for p in pieces:
        if p.repeat:
            out.extend(_at(p.events, n) * (n - n0))
        else:
            out.extend(_at(p.events, n))
    return out


# --- the model -----------------------------------------------------------------------------------

@dataclass
class _Template:
    """A unit's events (values maybe Lin), with the places of its marks and remote waits."""
    events: dict[str, tuple]
    lin: bool = field(init=False)
    marks: list[int] = field(init=False)  # kernel events of the unit's own marks
    refs: list[int] = field(init=False)  # kernel events waiting on another unit
    _at_n: dict[int, dict[str, tuple]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.lin = _has_lin(tuple(self.events.values()))
        k = self.events["kernels"]
        self.marks = [i for i, e in enumerate(k) if e.kind == "mark"]
        self.refs = [i for i, e in enumerate(k) if isinstance(e.wait_back, Ref)]

    def at(self, n: int) -> dict[str, tuple]:
        if not self.lin:
            return self.events
        if n not in self._at_n:
            self._at_n = {n: {name: _at(ev, n) for name, ev in self.events.items()}}
        return self._at_n[n]


@dataclass
class PipelineModel:
    """Everything needed to rebuild the step for any micro-batch count the templates cover."""
    shape: PipelineShape
    n0: int  # the count the prologue / epilogue pieces hold
    prologue: dict[str, list[Piece]]
    epilogue: dict[str, list[Piece]]
    units: dict[tuple, _Template]
    scalars: dict[str, Any]

    def streams(self, n: int) -> StepStreams:
        """The step for `n` micro-batches (FitError where a unit's key or a wait's target is
        missing)."""
        order = self.shape.order(n)
        if order is None:
            raise FitError(f"the schedule does not accept {n} micro-batches")
        out = {name: _pieces_at(self.prologue[name], self.n0, n) for name in STREAMS}
        kernels = out["kernels"]
        prologue_end = len(kernels)
        index = {(a.kind, a.stage, a.mb): i for i, a in enumerate(order) if a.mb is not None}
        latest: dict[tuple[str, int], int] = {}
        starts: list[int] = []
        pending: list[tuple[int, int]] = []  # (waiting event, awaited event)

        def awaited(r: Ref, waiting: Act | None) -> int:
            if r.base == "pro":
                return prologue_end + r.off
            return starts[_target(r, waiting, n, index, latest, len(starts))] + r.index

        for a, key in zip(order, unit_keys(self.shape, order, n)):
            t = self.units.get(key)
            if t is None:
                raise FitError(f"no unit of key {key}")
            ev = t.at(n)
            start = len(kernels)
            for name in ("memory", "ops", "collectives"):
                out[name].extend(ev[name])
            kernels.extend(ev["kernels"])
            for i in t.marks:
                e = kernels[start + i]
                kernels[start + i] = e._replace(label=f"{e.label[:-1]}{a.mb}")
            pending.extend((start + i, awaited(ev["kernels"][i].wait_back, a)) for i in t.refs)
            starts.append(start)
            if a.mb is None:
                latest[(a.kind, a.stage)] = len(starts) - 1
        epilogue_start = len(kernels)
        for name in STREAMS:
            out[name].extend(_pieces_at(self.epilogue[name], self.n0, n))
        pending.extend((i, awaited(kernels[i].wait_back, None))
                       for i in range(epilogue_start, len(kernels))
                       if isinstance(kernels[i].wait_back, Ref))
        if pending:
            groups: dict[tuple, list[int]] = {}
            for i, e in enumerate(kernels):
                groups.setdefault((e.module, e.stream), []).append(i)
            for w, target in pending:
                if not 0 <= target < w:
                    raise FitError("a wait's event is not before the waiting one")
                group = groups[(kernels[target].module, kernels[target].stream)]
                back = bisect.bisect_left(group, w) - bisect.bisect_left(group, target)
                kernels[w] = kernels[w]._replace(wait_module=kernels[target].module,
                                                 wait_stream=kernels[target].stream,
                                                 wait_back=back)
        streams = StepStreams(**out)
        streams.scalars = {k: _at(v, n) for k, v in self.scalars.items()}
        return streams

    def to_parts(self) -> dict[str, Any]:
        """JSON-able parts (the layer store's format, simdist/cache/layers.py)."""
        s = self.shape
        return {
            "format": FORMAT,
            "shape": [s.schedule, s.pp, s.num_stages, s.pp_rank],
            "n0": self.n0,
            "scalars": {k: _to_json(v) for k, v in self.scalars.items()},
            "prologue": {n: [[_to_json(p.events), p.repeat] for p in ps]
                         for n, ps in self.prologue.items()},
            "epilogue": {n: [[_to_json(p.events), p.repeat] for p in ps]
                         for n, ps in self.epilogue.items()},
            "units": [[_to_json(k), {n: _to_json(ev) for n, ev in t.events.items()}]
                      for k, t in self.units.items()],
        }

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> PipelineModel:
        def events(name: str, rows: Any) -> tuple:
            return tuple(named_event(name, e) for e in _from_json(rows))

        def pieces(d: dict) -> dict[str, list[Piece]]:
            return {n: [Piece(events(n, ev), rep) for ev, rep in rows] for n, rows in d.items()}

        return cls(PipelineShape(*parts["shape"]), parts["n0"], pieces(parts["prologue"]),
                   pieces(parts["epilogue"]),
                   {_from_json(k): _Template({n: events(n, ev) for n, ev in t.items()})
                    for k, t in parts["units"]},
                   {k: _from_json(v) for k, v in parts["scalars"].items()})


def _target(r: Ref, waiting: Act | None, n: int, index: dict, latest: dict, limit: int) -> int:
    """The unit a remote wait refers to (FitError where the order has none before `limit`,
    the waiting unit)."""
    if r.base == "latest":
        u = latest.get((r.kind, r.stage), -1)
    else:
        base = {"own": waiting.mb if waiting is not None and waiting.mb is not None else None,
                "n": n, "zero": 0}[r.base]
        u = -1 if base is None else index.get((r.kind, r.stage, base + r.off), -1)
    if not 0 <= u < limit:
        raise FitError(f"a wait's unit {r} is not before the waiting one")
    return u


def _to_json(x: Any) -> Any:
    if isinstance(x, Lin):
        return {"lin": [x.a, x.b]}
    if isinstance(x, Ref):
        return {"ref": list(x)}
    if isinstance(x, (tuple, list)):
        return [_to_json(v) for v in x]
    return x


def _from_json(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_from_json(v) for v in x)
    if isinstance(x, dict):
        return Lin(*x["lin"]) if "lin" in x else Ref(*x["ref"])
    return x


def fit_pipeline_model(shape: PipelineShape, runs: list[tuple[int, StepStreams]]) -> PipelineModel:
    """The model from two executed steps (n_a < n_b micro-batches); it reproduces both exactly,
    or FitError."""
    (na, sa), (nb, sb) = runs
    a, b = _normalise(sa, shape, na), _normalise(sb, shape, nb)
    # A key of one run only is not one of the count the model is for (memo_counts): it stays
    # as executed, for the check that the model reproduces its run.
    units = {key: _Template(t) for key, t in [*a.units.items(), *b.units.items()]}
    for key in a.units.keys() & b.units.keys():
        units[key] = _Template({name: tuple(_merge(x, y, na, nb) for x, y in
                                            _zip_same(a.units[key][name], b.units[key][name]))
                                for name in STREAMS})
    model = PipelineModel(
        shape, na,
        {name: _fit_pieces(a.prologue[name], b.prologue[name], na, nb) for name in STREAMS},
        {name: _fit_pieces(a.epilogue[name], b.epilogue[name], na, nb) for name in STREAMS},
        units, {k: _merge(a.scalars[k], b.scalars[k], na, nb) for k in SCALARS})
    for n, s in runs:
        if not same_streams(model.streams(n), s):
            raise FitError(f"the model does not reproduce the step of {n} micro-batches")
    return model


def _zip_same(x: tuple, y: tuple) -> zip:
    if len(x) != len(y):
        raise FitError("a unit has other events at another micro-batch count")
    return zip(x, y)


def same_streams(a: StepStreams, b: StepStreams) -> bool:
    """Event for event and scalar for scalar (the boundaries are not part of the step)."""
    return all(list(getattr(a, n)) == list(getattr(b, n)) for n in STREAMS) and \
        {k: a.scalars[k] for k in SCALARS} == {k: b.scalars[k] for k in SCALARS}
