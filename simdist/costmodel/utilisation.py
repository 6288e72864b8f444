"""Utilisation: FLOPs per step over what the GPUs could do in that time."""

from __future__ import annotations

__all__ = ["mfu"]


def mfu(model_flops_per_step: float, world_size: int, step_s: float, peak_flops: float) -> float:
    """FLOPs utilisation: FLOPs per step / (world_size * step_s * per-GPU peak)."""
    if world_size < 1 or step_s <= 0 or peak_flops <= 0:
        raise ValueError(f"need world_size >= 1, step_s > 0, peak_flops > 0; got {world_size}, {step_s}, {peak_flops}")
    return model_flops_per_step / (world_size * step_s * peak_flops)
