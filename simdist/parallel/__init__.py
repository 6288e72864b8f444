"""Plan -> torch.distributed (apply.py: the device mesh, ParallelPlan and one
`parallelize_<family>` per model family) and the pieces it is built from (checkpointing, data,
tensor, pipeline, context and expert parallelism, ZeRO), plus the exact rank classes.

Light on purpose: the planner and a warm run import parallel.classes and parallel.pipeline's
layer split, not torch.distributed's FSDP / DTensor (a second of imports); apply.py's names are
imported on first use (PEP 562)."""

from __future__ import annotations

from typing import Any

_APPLY = ("ParallelPlan", "build_device_mesh", "mesh_group_dims", "apply_data_parallel",
          "parallelize_llama3", "parallelize_gpt", "parallelize_moe", "parallelize_hf",
          "parallelize_custom")


def __getattr__(name: str) -> Any:
    if name in _APPLY:
        from simdist.parallel import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'simdist.parallel' has no attribute {name!r}")
