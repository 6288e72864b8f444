"""Pipeline ranks that share one execution: the middle ranks of a pipeline (neither the first
stage's nor the last stage's) rebuilt from the step of one of them, without executing.

Why this is exact. A middle rank runs the same program as every other middle rank: the same
module types with the same config and parameter shard layout in each of its stages (the same
number of blocks in each, so the same shapes), the same input metadata (activations received
from the previous stage, gradients from the next: no embedding, no head, no loss), the same
collectives on the same groups; torch.distributed.pipelining's schedule differs only in the
order of the actions (mode/pipeline_order.py gives it for any rank). What the pipeline memo
proves of one rank (mode/pipeline_memo.py: every unit of one key is identical within a run, the
key being what the unit is, not where it stands) therefore holds across these ranks, once the
three things that name the rank's place are translated: the stage ids (in the units' keys, the
waits between units and the schedule's marks), the blocks' indices in module names
(`layers.N`: the stage's own blocks), and the point-to-point peers (the previous and next pipeline
rank, by their rank in the pipeline group). So a middle rank's step is the source rank's unit
model translated to the middle rank's names and composed in its own order: the pipeline memo's
composition (`translate`, then PipelineModel.streams).

What must hold for two ranks to share, and is the share key (`share_key`): both middle ranks of
the same plan (the execution signature with the pipeline coordinate replaced by "middle"), with
the same number of blocks in each of their stages, of a model whose blocks are all the same
(the layer memo's condition: ModelSpec.layer_memo). A rank takes its units only from a source
whose order has every key its own needs (`unit_keys_of`; the coordinator chooses sources so:
memo.share_sources); where a unit is missing all the same, it is simulated itself. Tests
compare every shared rank with its full execution, row for row, for every schedule."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from simdist.execution_key import execution_signature
from simdist.mode.layer_memo import _block_pattern, _rank_depths
from simdist.mode.pipeline_memo import (FitError, Piece, PipelineModel, PipelineShape, Ref,
                                        _normalise, _Template, same_streams, unit_keys)
from simdist.trace import CollectiveEvent, KernelEvent, RankTask, StepStreams

_MARK = re.compile(r"^(begin|end) (\S+) (\d+) (.*)$")


def pipeline_rank(task: RankTask) -> int:
    return task.layout.coords(task.rank)["pp"]


def _stage_map(key: tuple, fn: Callable[[int], int]) -> tuple:
    """A unit's key (mode/pipeline_memo.py: unit_keys) with `fn` applied to its stage ids: its
    own, and for GPipe and 1F1B its previous action's."""
    key = list(key)
    key[1] = fn(key[1])
    if len(key) > 3 and isinstance(key[3], tuple):
        key[3] = (key[3][0], fn(key[3][1]), *key[3][2:])
    return tuple(key)


def share_key(task: RankTask) -> str | None:
    """The key ranks that can share one execution have in common; None for a rank that cannot
    (no pipeline, the first or the last pipeline rank: they hold the first or last stage)."""
    par = task.parallel
    if par.pp < 3 or not 0 < pipeline_rank(task) < par.pp - 1:
        return None
    if not task.model.layer_memo:  # blocks that differ (MoE's dense first layers and per-layer
        return None  # routing, an hf config of mixed blocks, user code): stages differ too
    sig = json.loads(execution_signature(task))
    sig["position"]["pp"] = "middle"
    stages, split, _ = _rank_depths(task)
    sig["depths"] = [len(split[s]) for s in stages]
    return json.dumps(sig, sort_keys=True, separators=(",", ":"))


def unit_keys_of(task: RankTask) -> frozenset:
    """The keys of the units `task`'s order needs (mode/pipeline_memo.py: unit_keys), stage ids
    as the rank's k-th stage: a rank rebuilds from another whose keys hold all of its own
    (torch's 1F1B with as many micro-batches as stages gives every middle rank its own warm-up
    length, and the steady state's shortest ranks lack keys the longer ones have)."""
    shape, n, pp = PipelineShape.of(task), task.num_microbatches, task.parallel.pp
    order = shape.order(n)
    if order is None:
        return frozenset()
    return frozenset(_stage_map(k, lambda s: s // pp) for k in unit_keys(shape, order, n))


def unit_model(task: RankTask, streams: StepStreams) -> PipelineModel:
    """The pipeline memo's model of `task`'s executed (or rebuilt) step, from that one step: its
    units by key, prologue and epilogue as they are. FitError where two units of one key
    differ or the model does not give the step back."""
    shape, n = PipelineShape.of(task), task.num_microbatches
    run = _normalise(streams, shape, n)
    model = PipelineModel(shape, n,
                          {k: [Piece(v, False)] for k, v in run.prologue.items()},
                          {k: [Piece(v, False)] for k, v in run.epilogue.items()},
                          {k: _Template(t) for k, t in run.units.items()}, run.scalars)
    if not same_streams(model.streams(n), streams):
        raise FitError("the units do not give the step back")
    return model


@dataclass(frozen=True)
class StageMap:
    """What names `source`'s place, and what names `target`'s instead."""
    source: RankTask
    target: RankTask

    @cached_property
    def stages(self) -> dict[int, int]:
        """Source stage id -> target stage id (stage k of one rank is stage k of the other)."""
        return dict(zip(_rank_depths(self.source)[0], _rank_depths(self.target)[0]))

    @cached_property
    def blocks(self) -> dict[int, int]:
        """Source block index -> target block index."""
        split = _rank_depths(self.source)[1]
        return {b: t for s_src, s_dst in self.stages.items()
                for b, t in zip(split[s_src], split[s_dst])}

    @cached_property
    def peer_shift(self) -> int:
        return pipeline_rank(self.target) - pipeline_rank(self.source)


def rebuild(model: PipelineModel, source: RankTask, target: RankTask) -> StepStreams:
    """`target`'s step from `source`'s unit model (FitError where a unit it needs is missing):
    the model translated to `target`'s names, composed in `target`'s order."""
    return translate(model, StageMap(source, target)).streams(target.num_microbatches)


def translate(model: PipelineModel, m: StageMap) -> PipelineModel:
    """`model` (of `m.source`) with `m.target`'s stage ids, block names and peers: the units'
    keys and events, the waits between units, the prologue and the epilogue."""
    blocks = m.source.model.block_path
    pattern = _block_pattern(blocks)
    names: dict = {}

    def module(name: object) -> object:
        if not isinstance(name, str):
            return name
        if name not in names:
            hit = pattern.match(name)
            names[name] = name if hit is None else (
                f"{hit.group(1)}{blocks}.{m.blocks[int(hit.group(2))]}{hit.group(3) or ''}")
        return names[name]

    def stage(s: int) -> int:
        return m.stages[s] if s >= 0 else s  # (-1: a wait on the prologue)

    def label(text: str) -> str:
        hit = _MARK.match(text)
        return text if hit is None else \
            f"{hit.group(1)} {hit.group(2)} {stage(int(hit.group(3)))} {hit.group(4)}"

    def kernel(e: KernelEvent) -> KernelEvent:
        wait = e.wait_back
        if isinstance(wait, Ref):
            wait = wait._replace(stage=stage(wait.stage))
        return e._replace(module=module(e.module), wait_module=module(e.wait_module),
                          wait_back=wait, label=label(e.label) if e.kind == "mark" else e.label)

    def collective(e: CollectiveEvent) -> CollectiveEvent:
        peer = e.peer + m.peer_shift if type(e.peer) is int and e.peer >= 0 else e.peer
        return e._replace(module=module(e.module), peer=peer)

    event = {"memory": lambda e: e._replace(module=module(e.module)),
             "ops": lambda e: e._replace(head=e.head._replace(module=module(e.head.module))),
             "collectives": collective, "kernels": kernel}

    def events(name: str, evs: tuple) -> tuple:
        return tuple(event[name](e) for e in evs)

    def pieces(parts: dict[str, list[Piece]]) -> dict[str, list[Piece]]:
        return {n: [Piece(events(n, p.events), p.repeat) for p in ps] for n, ps in parts.items()}

    return PipelineModel(
        PipelineShape.of(m.target), model.n0, pieces(model.prologue), pieces(model.epilogue),
        {_stage_map(k, stage): _Template({n: events(n, ev) for n, ev in t.events.items()})
         for k, t in model.units.items()},
        dict(model.scalars))
