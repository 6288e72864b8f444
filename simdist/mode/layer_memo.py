"""The layer memo: a rank whose stages hold m identical transformer blocks is executed with
a, a+1 and a+2 blocks per stage (a = 2), and its step for m blocks is rebuilt from those.

Why this is exact, and how it is checked: the blocks of a stage are the same module type with
the same config, parameter shard layout, input metadata and checkpointing policy, so adding one
block to a stage adds the same events (memory, ops, collectives) at the same places of the
step, differing only in the block's index in module names (`<blocks>.N`, at the model's own
block path: `layers`, Hugging Face's `hf.model.layers` or `hf.transformer.h`). The memo finds
those places by diffing the step with a blocks against the step with a+1 (module names made
position-relative, blocks after the inserted one renumbered), then

1. predicts the step with a+2 blocks from the two and requires it to equal the executed a+2
   step event for event (otherwise the rank is executed in full: `FALLBACK`);
2. builds the m-block step by inserting m-a copies at every place, renumbered, and aggregates
   it with the same `summarize` as full execution.

The result is the event streams full execution would record; tests compare both, row for row,
on full models. Blocks execute 3a+3 times per rank instead of m (9 instead of 80 for Llama 3
70B), whatever the depth.

Where a place lies in backward the copies run in descending block order (autograd walks the
stack backwards); elsewhere ascending. Foreach ops (the optimizer's) grow their tensor lists
with the depth: their items are diffed the same way, one level down.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from simdist.parallel.pipeline import rank_stage_ids, split_layers
from simdist.trace import (SCALARS, STREAMS, Boundary, OpEvent, OpItem, RankTask, StepStreams,
                           named_event)

BASE_LAYERS = 2  # a: the shortest stage executed; blocks 0 and a-1 stay first and last
_AFTER = BASE_LAYERS - 2  # new blocks go after this position (before the stage's last block)


@functools.cache
def _block_pattern(blocks: str) -> re.Pattern:
    """Module paths inside block N of the container at `blocks` (`layers`, `hf.model.layers`,
    `hf.transformer.h`): (what precedes the container, N, the path inside the block)."""
    return re.compile(rf"^(.*?)(?:^|(?<=\.)){re.escape(blocks)}\.(\d+)(\..*)?$")


@dataclass(frozen=True)
class LayerRef:
    """A module path inside a block, by the block's stage and position within the stage."""
    prefix: str
    stage: int
    pos: int
    suffix: str


@dataclass(frozen=True)
class MemoShape:
    """How the memo rebuilds this rank: its stages, their block count and first block index,
    and the module path of the model's blocks."""
    stages: tuple[int, ...]
    offsets: dict[int, int]
    layers_per_stage: int
    num_stages: int
    blocks: str

    def reduced(self, task: RankTask, per_stage: int) -> RankTask:
        """`task` with `per_stage` blocks in every pipeline stage."""
        model = task.model.with_layers(per_stage * self.num_stages)
        pp_layers = [per_stage] * self.num_stages if self.num_stages > 1 else None
        return replace(task.with_parallel(pp_layers=pp_layers), model=model)


def _rank_depths(task: RankTask) -> tuple[list[int], list[list[int]], int]:
    """This rank's stage ids, every stage's layer indices, and the number of stages."""
    pp, per_rank, num_stages = task.parallel.pp, task.parallel.stages_per_rank, task.parallel.stages
    split = split_layers(task.model.n_layers or 0, num_stages, task.parallel.pp_layers)
    stages = (rank_stage_ids(task.layout.coords(task.rank)["pp"], pp, per_rank)
              if pp > 1 else [0])
    return stages, split, num_stages


def rank_blocks(task: RankTask) -> int:
    """Transformer blocks this rank holds (over all its pipeline stages)."""
    stages, split, _ = _rank_depths(task)
    return sum(len(split[s]) for s in stages)


def memo_shape(task: RankTask) -> MemoShape | None:
    """The memo shape of `task`, or None where the memo does not apply (a model whose blocks are
    not all the same, stages of this rank with different depths, or stages too short to gain)."""
    if not task.model.layer_memo:
        return None
    stages, split, num_stages = _rank_depths(task)
    depths = {len(split[s]) for s in stages}
    if len(depths) != 1 or (m := depths.pop()) < BASE_LAYERS + 3:
        return None
    return MemoShape(tuple(stages), {s: split[s][0] for s in stages}, m, num_stages,
                     task.model.block_path)


# --- module names <-> LayerRef -------------------------------------------------------------------

# Op events keep their module path and phase in their head; the other streams on the event.
# (The kernel stream also names the module of the event it waits for.)
def _get_module(stream: str, ev: tuple) -> Any:
    return ev.head.module if stream == "ops" else ev.module


def _set_module(stream: str, ev: tuple, module: Any) -> tuple:
    if stream == "ops":
        return ev._replace(head=ev.head._replace(module=module))
    return ev._replace(module=module)


def _map_modules(stream: str, ev: tuple, fn: Callable[[Any], Any]) -> tuple:
    """`ev` with `fn` applied to each of its module fields."""
    ev = _set_module(stream, ev, fn(_get_module(stream, ev)))
    if stream == "kernels" and ev.wait_back:
        ev = ev._replace(wait_module=fn(ev.wait_module))
    return ev


def _phase(stream: str, ev: tuple) -> str:
    return ev.head.phase if stream == "ops" else ev.phase


def _canonical(streams: StepStreams, per_stage: int, blocks: str) -> dict[str, list[tuple]]:
    cache: dict[str, Any] = {}
    pattern = _block_pattern(blocks)

    def ref(module: str) -> Any:
        if module not in cache:
            m = pattern.match(module)
            if m is None:
                cache[module] = module
            else:
                stage, pos = divmod(int(m.group(2)), per_stage)
                cache[module] = LayerRef(m.group(1), stage, pos, m.group(3) or "")
        return cache[module]

    out = {name: [_map_modules(name, ev, ref) for ev in getattr(streams, name)]
           for name in STREAMS}
    out["kernels"] = _waits_across(out["kernels"])
    return out


# A kernel event names the event it waits for by module and count back within that module, so
# blocks inserted between the two change nothing. Where the two are different blocks (a
# block's FSDP2 copy-out waits for the all-gather its predecessor's backward prefetched), the
# waited block is "the one that ran before", which an inserted block changes: the canonical
# form names such an event by its count back along its stream instead (_ACROSS), the same at
# every depth, and the rebuilt stream names it by module again (_waits_within).
_ACROSS = "<another block>"


def _other_block(a: Any, b: Any) -> bool:
    return (isinstance(a, LayerRef) and isinstance(b, LayerRef)
            and (a.stage, a.pos) != (b.stage, b.pos))


def _waits_across(events: list[tuple]) -> list[tuple]:
    by_module: dict[tuple[Any, str], list[int]] = {}
    by_stream: dict[str, list[int]] = {}
    out = []
    for i, e in enumerate(events):
        if e.wait_back > 0 and _other_block(e.module, e.wait_module):
            target = by_module[(e.wait_module, e.wait_stream)][-e.wait_back]
            same = by_stream[e.wait_stream]
            out.append(e._replace(wait_module=_ACROSS,
                                  wait_back=len(same) - bisect.bisect_left(same, target)))
        else:
            out.append(e)
        by_module.setdefault((e.module, e.stream), []).append(i)
        by_stream.setdefault(e.stream, []).append(i)
    return out


def _waits_within(events: list[tuple]) -> list[tuple]:
    by_module: dict[tuple[Any, str], list[int]] = {}
    by_stream: dict[str, list[int]] = {}
    out = []
    for i, e in enumerate(events):
        if e.wait_module == _ACROSS:
            target = by_stream[e.wait_stream][-e.wait_back]
            t = events[target]
            same = by_module[(t.module, t.stream)]
            e = e._replace(wait_module=t.module,
                           wait_back=len(same) - bisect.bisect_left(same, target))
        out.append(e)
        by_module.setdefault((e.module, e.stream), []).append(i)
        by_stream.setdefault(e.stream, []).append(i)
    return out


def _moved(stream: str, events: list[tuple], fn: Callable[[LayerRef], Any]) -> list[tuple]:
    def move(m: Any) -> Any:
        return fn(m) if isinstance(m, LayerRef) else m

    return [_map_modules(stream, ev, move) for ev in events]


def _shift_after(stream: str, events: list[tuple], after: int, by: int) -> list[tuple]:
    """Blocks at positions > `after` move `by` positions down the stage."""
    return _moved(stream, events,
                  lambda r: replace(r, pos=r.pos + by) if r.pos > after else r)


# --- fitting the insertion model -----------------------------------------------------------------

@dataclass
class _Insert:
    at: int  # index into the a-block stream before which the segment goes
    segment: list[tuple]  # as in the (a+1)-block stream
    # The copies of segment[:split] come first, then those of segment[split:]: a block whose
    # events nest around the next one's (allocations ascending, frees descending) adds its
    # two halves at one place of the a-block stream.
    split: int = -1
    # The order the copies run in: None, by phase (backward walks the blocks descending);
    # True / False where the step runs them otherwise (the pipeline's deferred reductions of
    # the units run ascending inside backward).
    descending: bool | None = None


@dataclass
class _Inner:
    at: int
    edits: list  # list[_Insert] over the event's items


class FitError(Exception):
    """The (a+1)-block step is not the a-block step plus inserted events."""


def _insertions(old: list, new: list, inner: bool) -> list:
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    edits: list = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "insert":
            edits.append(_Insert(i1, new[j1:j2]))
        elif tag == "replace" and inner:
            # Foreach ops (same kernel, longer tensor lists), maybe next to inserted ops: align
            # the block by op heads.
            heads = difflib.SequenceMatcher(None, [t.head for t in old[i1:i2]],
                                            [t.head for t in new[j1:j2]], autojunk=False)
            for tag2, a1, a2, b1, b2 in heads.get_opcodes():
                if tag2 == "insert":
                    edits.append(_Insert(i1 + a1, new[j1 + b1:j1 + b2]))
                elif tag2 != "equal":
                    raise FitError(f"{tag2} of ops at {i1 + a1}:{i1 + a2}")
                for k in range(a2 - a1 if tag2 == "equal" else 0):
                    o, n = old[i1 + a1 + k], new[j1 + b1 + k]
                    if o != n:
                        edits.append(_Inner(i1 + a1 + k, _insertions(list(o.items),
                                                                     list(n.items), False)))
        else:
            raise FitError(f"{tag} at {i1}:{i2} -> {j1}:{j2}")
    return edits


def _copies(stream: str, part: list[tuple], extra: int,
            descending: bool | None = None) -> list[tuple]:
    """`extra` copies of the events one block adds, renumbered (as recorded, the new block is
    at position after+1; copy k is at after+k), in the order the blocks run there."""
    if not part:
        return []
    if descending is None:
        descending = _phase(stream, part[0]) == "bwd"
    out: list[tuple] = []
    for k in (range(extra, 0, -1) if descending else range(1, extra + 1)):
        out.extend(_moved(stream, part, lambda r, d=k - 1: replace(r, pos=r.pos + d)))
    return out


def _render(stream: str, segment: list[tuple], split: int, extra: int,
            descending: bool | None = None) -> list[tuple]:
    return (_copies(stream, segment[:split], extra, descending)
            + _copies(stream, segment[split:], extra, descending))


def extrapolate(stream: str, short: list[tuple], edits: list, after: int, extra: int,
                target: list[tuple] | None = None) -> list[tuple]:
    """The stream with `extra` blocks inserted after position `after` of every stage. With
    `target` (the executed stream for that depth), the edits' places and splits are chosen to
    reproduce it (`_place`), and FitError is raised where none does."""
    base = _shift_after(stream, short, after, extra)
    out: list[tuple] = []
    cursor = 0

    def check(upto: int) -> None:
        if target is not None and target[len(out) - upto:len(out)] != out[len(out) - upto:]:
            raise FitError(f"prediction differs before event {len(out)}")

    for i, e in enumerate(edits):
        if target is not None and isinstance(e, _Insert):
            limit = edits[i + 1].at if i + 1 < len(edits) else len(short)
            _place(stream, e, short, base, cursor, out, target, after, extra, limit)
        chunk = base[cursor:e.at]
        out.extend(chunk)
        check(len(chunk))
        cursor = e.at
        if isinstance(e, _Inner):
            head, items = base[e.at]
            out.append(OpEvent(head, tuple(_repeat_items(list(items), e.edits, extra))))
            check(1)
            cursor += 1
            continue
        out.extend(_render(stream, e.segment, e.split, extra, e.descending))
    out.extend(base[cursor:])
    if target is not None and out != target:
        raise FitError("prediction differs at the end")
    return out


def _place(stream: str, e: _Insert, short: list[tuple], base: list[tuple], cursor: int,
           out: list[tuple], target: list[tuple], after: int, extra: int, limit: int) -> None:
    """Choose where `e` goes and its split so that the copies reproduce `target`, and set them
    on `e`. The diff's place is tried first, then the same insertion slid later: where the
    segment starts with the event that follows it (a backward prefetch that repeats, say),
    inserting S before x equals inserting S[1:] + [x] after x in the (a+1)-block stream, but the
    copies of the two differ; the diff picks one of them arbitrarily. Slides stop at the next
    edit (`limit`)."""
    at, segment = e.at, e.segment
    while True:
        start = len(out) + at - cursor
        if base[cursor:at] == target[len(out):start]:
            for descending in (None, True, False):
                for split in [len(segment)] + list(range(1, len(segment))):
                    rendered = _render(stream, segment, split, extra, descending)
                    if target[start:start + len(rendered)] == rendered:
                        e.at, e.segment, e.split, e.descending = at, segment, split, descending
                        return
        if at >= limit or not segment:
            break
        x = _shift_after(stream, [short[at]], after, 1)[0]  # as in the (a+1)-block stream
        if segment[0] != x:
            break
        at, segment = at + 1, segment[1:] + [x]
    raise FitError(f"no place or split of the segment inserted at {e.at} fits")


def _repeat_items(items: list, edits: list[_Insert], extra: int) -> list:
    out, cursor = [], 0
    for e in edits:
        out.extend(items[cursor:e.at])
        cursor = e.at
        out.extend(e.segment * extra)
    out.extend(items[cursor:])
    return out


def _positions(n: int, edits: list, extra: int) -> list[int]:
    """Where each of the `n` events of the short stream lands in the stream `extrapolate` makes
    with `extra` blocks more per stage (an insertion adds `extra` copies of its segment before
    the event it is at; an _Inner edit keeps its one event)."""
    out: list[int] = []
    shift = cursor = 0
    for e in edits:
        out.extend(range(cursor + shift, e.at + shift))
        cursor = e.at
        if isinstance(e, _Insert):
            shift += extra * len(e.segment)
    out.extend(range(cursor + shift, n + shift))
    return out


def extrapolate_boundaries(short: list[Boundary], lengths: dict[str, int],
                           edits: dict[str, list], extra: int) -> list[Boundary]:
    """The schedule's action boundaries (indices into the kernel and memory streams) of the step
    with `extra` blocks more per stage: each stays just after the event it followed."""
    maps = {n: _positions(lengths[n], edits[n], extra) for n in ("kernels", "memory")}

    def moved(name: str, i: int) -> int:
        return maps[name][i - 1] + 1 if i > 0 else 0

    return [Boundary(b.label, moved("kernels", b.kernels), moved("memory", b.memory))
            for b in short]


def fit(stream: str, short: list[tuple], longer: list[tuple], longest: list[tuple],
        after: int) -> list:
    """Edits that turn the a-block stream into the (a+1)-block one (block `after + 1` is new),
    with their splits chosen so that two copies give the (a+2)-block stream; FitError if the
    streams are not of that form."""
    edits = _insertions(_shift_after(stream, short, after, 1), longer, inner=stream == "ops")
    extrapolate(stream, short, edits, after, 2, target=longest)
    return edits


# --- the memo --------------------------------------------------------------------------------------

@dataclass
class StreamModel:
    """Everything needed to rebuild the step of any depth: the a-block streams and the edits
    that one more block per stage makes, plus the scalars' per-block increments."""
    short: dict[str, list[tuple]]
    edits: dict[str, list]
    scalars: dict[str, int]
    scalar_steps: dict[str, int]
    # The short step's pipeline action boundaries (none outside pipelines; a model stored
    # before they were kept has None: it cannot give a pipeline memo its steps).
    boundaries: list[Boundary] | None = None

    def to_parts(self) -> dict[str, Any]:
        """JSON-able parts (the layer store's format, simdist/cache/layers.py)."""
        parts: dict[str, Any] = {"scalars": self.scalars, "scalar_steps": self.scalar_steps,
                                 "short.boundaries": [list(b) for b in self.boundaries or []]}
        for n in STREAMS:
            parts[f"short.{n}"] = _to_json(self.short[n])
            parts[f"edits.{n}"] = _edits_to_json(self.edits[n])
        return parts

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> StreamModel:
        bounds = parts.get("short.boundaries")
        return cls(short={n: _events_from_json(n, parts[f"short.{n}"]) for n in STREAMS},
                   edits={n: _edits_from_json(n, parts[f"edits.{n}"]) for n in STREAMS},
                   scalars=parts["scalars"], scalar_steps=parts["scalar_steps"],
                   boundaries=None if bounds is None else [Boundary(*b) for b in bounds])

    def streams(self, shape: MemoShape) -> StepStreams:
        extra = shape.layers_per_stage - BASE_LAYERS
        out = StepStreams()
        for name in STREAMS:
            events = extrapolate(name, self.short[name], self.edits[name], _AFTER, extra)
            events = _moved(name, events, lambda r: _module_name(r, shape))
            setattr(out, name, _waits_within(events) if name == "kernels" else events)
        out.scalars = {k: self.scalars[k] + extra * self.scalar_steps[k] for k in SCALARS}
        out.boundaries = extrapolate_boundaries(self.boundaries or [], self._lengths(),
                                                self.edits, extra)
        return out

    def _lengths(self) -> dict[str, int]:
        return {n: len(self.short[n]) for n in STREAMS}


def _to_json(x: Any) -> Any:
    if isinstance(x, LayerRef):
        return {"L": [x.prefix, x.stage, x.pos, x.suffix]}
    if isinstance(x, (tuple, list)):
        return [_to_json(v) for v in x]
    return x


def _from_json(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_from_json(v) for v in x)
    if isinstance(x, dict):
        return LayerRef(*x["L"])
    return x


def _edits_to_json(edits: list) -> list:
    return [{"inner": e.at, "edits": _edits_to_json(e.edits)} if isinstance(e, _Inner)
            else {"at": e.at, "split": e.split, "descending": e.descending,
                  "segment": _to_json(e.segment)} for e in edits]


def _events_from_json(stream: str, rows: list) -> list[tuple]:
    return [named_event(stream, ev) for ev in _from_json(rows)]


def _edits_from_json(stream: str, rows: list) -> list:
    """`stream` None: the edits of one op's items (inside an _Inner)."""
    return [_Inner(r["inner"], _edits_from_json(None, r["edits"])) if "inner" in r
            else _Insert(r["at"], _events_from_json(stream, r["segment"]) if stream
                         else [OpItem(*i) for i in _from_json(r["segment"])], r["split"],
                         r.get("descending"))
            for r in rows]


def _module_name(r: LayerRef, shape: MemoShape) -> str:
    return f"{r.prefix}{shape.blocks}.{shape.offsets[r.stage] + r.pos}{r.suffix}"


def fit_stream_model(runs: list[StepStreams], blocks: str) -> StreamModel | None:
    """From the a, a+1, a+2 block steps (`blocks`: the blocks' module path): the stream model,
    or None if the a+2 step is not what it predicts (then the memo does not apply and the rank
    is executed in full)."""
    canon = [_canonical(s, BASE_LAYERS + i, blocks) for i, s in enumerate(runs)]
    try:
        edits = {name: fit(name, canon[0][name], canon[1][name], canon[2][name], _AFTER)
                 for name in STREAMS}
    except FitError:
        return None
    s0, s1, s2 = (r.scalars for r in runs)
    steps = {k: s1[k] - s0[k] for k in SCALARS}
    if any(s2[k] - s1[k] != steps[k] for k in SCALARS):
        return None
    model = StreamModel(canon[0], edits, dict(s0), steps, list(runs[0].boundaries))
    lengths = model._lengths()
    if any(extrapolate_boundaries(model.boundaries, lengths, edits, i) != list(r.boundaries)
           for i, r in ((1, runs[1]), (2, runs[2]))):
        return None
    return model
