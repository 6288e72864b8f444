"""Pipeline parallelism with torch.distributed.pipelining: layer split, per-rank stage modules,
schedules. The worker drives `schedule.step` itself (see mode/pipeline.py)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from simdist.config import ParallelConfig


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    """SCHEDULES on first use: torch.distributed.pipelining imports torch._dynamo (half a
    second), which only ranks that execute need, not the planner or a warm run."""
    if name != "SCHEDULES":
        raise AttributeError(name)
    from torch.distributed.pipelining.schedules import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                 "interleaved_1f1b": ScheduleInterleaved1F1B,
                 "zero_bubble": ScheduleInterleavedZeroBubble}
    globals()["SCHEDULES"] = schedules
    return schedules

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


# Modules only the first stage keeps (embeddings) and only the last (final norm, head).
STAGE_FIRST_ONLY = ("tok_embeddings", "pos_embeddings")
STAGE_LAST_ONLY = ("norm", "output")


def prune_to_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """Keep this stage's layers; embeddings only on the first stage, norm + head on the last
    (torchtitan's convention: dropped modules become None and forward skips them)."""
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    for names, kept in ((STAGE_FIRST_ONLY, first), (STAGE_LAST_ONLY, last)):
        for name in names:
            if not kept and hasattr(model, name):
                setattr(model, name, None)
    return model


def stage_parts(build: Callable[[], nn.Module], n_layers: int, parallel: ParallelConfig,
                pp_rank: int) -> list[tuple[int, nn.Module]]:
    """(stage id, module) for every stage rank `pp_rank` holds; `build()` makes a whole model."""
    if parallel.pp == 1:
        return [(0, build())]
    num_stages = parallel.stages
    layers = split_layers(n_layers, num_stages, parallel.pp_layers)
    return [(sid, prune_to_stage(build(), layers[sid], sid == 0, sid == num_stages - 1))
            for sid in rank_stage_ids(pp_rank, parallel.pp, parallel.stages_per_rank)]
