"""simdist: what happens on every GPU when you train this model with this plan on this cluster,
found by running the real model and torch.distributed code on fake tensors."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["simulate", "simulate_async", "load_config", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import simdist` must not import torch/ray
    if name in ("simulate", "simulate_async"):
        from simdist import coordinator

        return getattr(coordinator, name)
    if name == "load_config":
        from simdist.config import load_config

        return load_config
    raise AttributeError(name)
