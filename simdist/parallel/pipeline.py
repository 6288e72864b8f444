"""Pipeline parallelism with torch.distributed.pipelining: layer split, per-rank stage modules,
schedules. The worker drives `schedule.step` itself (see mode/pipeline.py)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
MULTI_STAGE = {"interleaved_1f1b", "zero_bubble"}


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    return virtual_stages if schedule in MULTI_STAGE else 1


def split_layers(n_layers: int, num_stages: int, pp_layers: list[int] | None) -> list[list[int]]:
    """Layer indices of every stage: `pp_layers` when given, else as even as possible (the
    earlier stages take the remainder, as torchtitan's default split does)."""
    if pp_layers is None:
        base, extra = divmod(n_layers, num_stages)
        pp_layers = [base + (1 if s < extra else 0) for s in range(num_stages)]
    bounds = [0]
    for n in pp_layers:
        bounds.append(bounds[-1] + n)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(num_stages)]


def rank_stage_ids(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """Looped placement: rank r holds stages r, r + pp, r + 2pp, ..."""
    return [pp_rank + k * pp for k in range(per_rank)]


def prune_to_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """Keep this stage's layers; embeddings only on the first stage, norm + head on the last
    (torchtitan's convention: dropped modules become None and forward skips them)."""
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
        if hasattr(model, "pos_embeddings"):
            model.pos_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


def stage_parts(build: Callable[[], nn.Module], n_layers: int, pp: int, pp_rank: int,
                schedule: str, virtual_stages: int,
                pp_layers: list[int] | tuple[int, ...] | None) -> list[tuple[int, nn.Module]]:
    """(stage id, module) for every stage rank `pp_rank` holds; `build()` makes a whole model."""
    if pp == 1:
        return [(0, build())]
    per_rank = stages_per_rank(schedule, virtual_stages)
    num_stages = pp * per_rank
    layers = split_layers(n_layers, num_stages, list(pp_layers) if pp_layers else None)
    return [(sid, prune_to_stage(build(), layers[sid], sid == 0, sid == num_stages - 1))
            for sid in rank_stage_ids(pp_rank, pp, per_rank)]
