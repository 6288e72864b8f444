"""Where a model's transformer blocks are: what FSDP wraps one unit each, checkpointing wraps,
and DDP buckets. `model.layers` for simdist's families; a model may name another container (a
ModuleList or ModuleDict, e.g. Hugging Face's `model.layers` / `transformer.h` inside the
adapter, or a user entrypoint's `blocks:` path) in its `simdist_blocks` attribute."""

from __future__ import annotations

from torch import nn

DEFAULT_BLOCKS = "layers"


class BlocksNotFound(LookupError):
    """The model has no block container at the path it names (or at `layers`)."""

    def __init__(self, path: str, candidates: list[str]) -> None:
        super().__init__(path, candidates)
        self.path, self.candidates = path, candidates

    def __str__(self) -> str:
        some = ", ".join(self.candidates[:6]) or "none"
        return (f"the model has no ModuleList or ModuleDict of blocks at {self.path!r}; "
                f"containers it has: {some}")


def block_path(model: nn.Module) -> str:
    return getattr(model, "simdist_blocks", None) or DEFAULT_BLOCKS


def containers(model: nn.Module) -> list[str]:
    """Paths of the model's non-empty ModuleLists and ModuleDicts, shortest first."""
    found = [n for n, m in model.named_modules()
             if n and isinstance(m, (nn.ModuleList, nn.ModuleDict)) and len(m)]
    return sorted(found, key=lambda n: (n.count("."), n))


def block_container(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    path = block_path(model)
    try:
        container = model.get_submodule(path)
    except AttributeError:
        raise BlocksNotFound(path, containers(model)) from None
    if not isinstance(container, (nn.ModuleList, nn.ModuleDict)):
        raise BlocksNotFound(path, containers(model))
    return container


def block_items(model: nn.Module) -> list[tuple[str | int, nn.Module]]:
    """(key, block) in order; `container[key] = wrapped` replaces a block."""
    container = block_container(model)
    if isinstance(container, nn.ModuleDict):
        return list(container.items())
    return list(enumerate(container))
