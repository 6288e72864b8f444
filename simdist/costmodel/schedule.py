"""First step-time combiner: compute + exposed communication + pipeline bubble.

Deliberately small and explicit; a per-stream schedule simulator replaces it later.

Overlap assumption (optimistic): communication issued in an overlappable phase ("fwd",
"bwd": FSDP all-gathers / reduce-scatters, DDP bucketed all-reduce) hides behind that
phase's compute, so only ``max(0, comm - compute)`` is exposed. Real runs also expose the
first all-gather of the step and the last reduce-scatter, and TP collectives sit on the
critical path; this model does not see either. Communication in any other phase ("optim",
e.g. a gradient-norm all-reduce) is fully exposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["StepTime", "combine", "mfu"]


@dataclass
class StepTime:
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    bubble_s: float
    step_s: float


def _check(name: str, m: Mapping[str, float]) -> None:
    for k, v in m.items():
        if v < 0:
            raise ValueError(f"{name}[{k!r}] must be >= 0, got {v}")


def combine(
    compute_by_phase: Mapping[str, float],
    comm_by_phase: Mapping[str, float],
    *,
    overlappable: Iterable[str] = ("fwd", "bwd"),
    bubble_s: float = 0.0,
) -> StepTime:
    """Step time from per-phase compute and communication seconds (phases "fwd","bwd","optim")."""
    _check("compute_by_phase", compute_by_phase)
    _check("comm_by_phase", comm_by_phase)
    if bubble_s < 0:
        raise ValueError(f"bubble_s must be >= 0, got {bubble_s}")
    overlappable = set(overlappable)
    compute = float(sum(compute_by_phase.values()))
    comm = float(sum(comm_by_phase.values()))
    exposed = 0.0
    for phase, c in comm_by_phase.items():
        if phase in overlappable:
            exposed += max(0.0, c - compute_by_phase.get(phase, 0.0))
        else:
            exposed += c
    return StepTime(
        compute_s=compute,
        comm_s=comm,
        exposed_comm_s=exposed,
        bubble_s=float(bubble_s),
        step_s=compute + exposed + bubble_s,
    )


def mfu(model_flops_per_step: float, world_size: int, step_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per step / (world_size * step_s * per-GPU peak)."""
    if world_size < 1 or step_s <= 0 or peak_flops <= 0:
        raise ValueError(f"need world_size >= 1, step_s > 0, peak_flops > 0; got {world_size}, {step_s}, {peak_flops}")
    return model_flops_per_step / (world_size * step_s * peak_flops)


def pipeline_bubble(stage_compute_s: float, pp: int, virtual_stages: int, n_microbatches: int,
                    schedule: str) -> float:
    """Idle time of a pipeline stage per step, from the schedule's published bubble.

    `stage_compute_s` is the stage's forward + backward compute for all micro-batches.
    GPipe and 1F1B idle (p - 1) micro-batch slots (Narayanan et al. 2021); interleaving over v
    virtual stages divides the slot by v; zero-bubble (Qi et al. 2023, ZB-H1) keeps about a third
    of the interleaved bubble, with forward, input-grad and weight-grad passes of equal cost.
    """
    if pp <= 1 or n_microbatches <= 0:
        return 0.0
    slot = stage_compute_s / n_microbatches
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) * slot
    if schedule == "interleaved_1f1b":
        return (pp - 1) * slot / virtual_stages
    if schedule == "zero_bubble":
        return (pp - 1) * slot / virtual_stages / 3
    raise ValueError(f"unknown pipeline schedule {schedule!r}")
