"""The order in which a rank runs its pipeline schedule's actions, for any micro-batch count,
from torch.distributed.pipelining's own schedule classes, without executing anything.

The runtime schedules (interleaved 1F1B, zero bubble) lower their compute order to one that
holds every action a rank takes (`pipeline_order_with_comms`: forwards, backwards, sends,
receives, FSDP unshard / reshard, gradient reductions); their schedule objects are built on
stand-in stages (the order depends only on the stage ids, the stage count and the group size).
The single-stage ones (GPipe, 1F1B) run their compute actions and drive the sends and receives
from the code of `_step_microbatches`, whose order is written out here: their schedule IR
(`_get_pipeline_order`) is not what runs (torch 2.13's 1F1B IR numbers the last stage's
forwards from 1). The pipeline memo checks every executed order against these."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from torch.distributed.pipelining.schedules import PipelineScheduleMulti

from simdist.parallel.pipeline import SCHEDULES, rank_stage_ids

COMPUTE = ("F", "B", "I", "W")


class Act(NamedTuple):
    """One action of a rank's schedule: its kind (F B I W, or the runtime's SEND_F RECV_F
    SEND_B RECV_B UNSHARD RESHARD REDUCE_GRAD), stage and micro-batch (None: of every
    micro-batch, e.g. an unshard)."""
    kind: str
    stage: int
    mb: int | None

    def label(self) -> str:
        """The action as the runtime names it (`record_function("PP:<action>")`)."""
        return f"{self.stage}{self.kind}{'' if self.mb is None else self.mb}"


class _Stage:
    """What a schedule reads of a stage to compute its order."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int,
                 group_rank: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, group_rank
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.has_backward = True
        self.submod = None


def is_runtime(schedule: str) -> bool:
    """Whether the schedule runs a lowered action order (else its code drives the p2p)."""
    return issubclass(SCHEDULES[schedule], PipelineScheduleMulti)


def action_order(schedule: str, pp: int, num_stages: int, pp_rank: int,
                 n: int) -> tuple[Act, ...] | None:
    """The actions of pipeline rank `pp_rank` for `n` micro-batches, in the order it runs them;
    None where the schedule does not accept `n`."""
    if n < 1:
        return None
    if not is_runtime(schedule):
        return _single_stage_order(schedule, num_stages, pp_rank, n)
    orders = _runtime_orders(schedule, pp, num_stages, n)
    return None if orders is None else orders[pp_rank]


@lru_cache(maxsize=64)
def _runtime_orders(schedule: str, pp: int, num_stages: int,
                    n: int) -> dict[int, tuple[Act, ...]] | None:
    """Every rank's lowered order (the schedule computes them all, whichever rank builds it)."""
    stages = [_Stage(s, num_stages, pp, 0) for s in rank_stage_ids(0, pp, num_stages // pp)]
    try:
        orders = SCHEDULES[schedule](stages, n).pipeline_order_with_comms
    except (ValueError, AssertionError, RuntimeError):  # a count the schedule refuses
        return None
    return {rank: tuple(Act(a.computation_type.value, a.stage_index, a.microbatch_index)
                        for a in order if a is not None) for rank, order in orders.items()}


def _single_stage_order(schedule: str, num_stages: int, stage: int,
                        n: int) -> tuple[Act, ...] | None:
    """ScheduleGPipe: every forward, then every backward. Schedule1F1B (it refuses fewer
    micro-batches than stages): num_stages - stage warm-up forwards, then backward and forward
    alternating while forwards remain, then the remaining backwards."""
    if schedule == "gpipe":
        return tuple(Act("F", stage, i) for i in range(n)) + \
            tuple(Act("B", stage, i) for i in range(n))
    if n < num_stages:
        return None
    warm = min(n, num_stages - stage)
    order = [Act("F", stage, i) for i in range(warm)]
    for i in range(n):
        order.append(Act("B", stage, i))
        if warm + i < n:
            order.append(Act("F", stage, warm + i))
    return tuple(order)
