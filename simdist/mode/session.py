"""A rank session: this process plays rank r of W under torch's fake process group, with DTensor
sharding propagation fenced off from the recorders (it runs ops on global-shape fakes that no
GPU would run)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore

from simdist.mode.context import StepContext


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    if dist.is_initialized():  # a previous call died mid-way: start clean
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def exclude_sharding_propagation(ctx: StepContext) -> Iterator[None]:
    orig = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with ctx.exclude():
            return orig(self, *args, **kwargs)

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = orig


@contextlib.contextmanager
def rank_session(rank: int, world_size: int, ctx: StepContext) -> Iterator[None]:
    with fake_process_group(rank, world_size), exclude_sharding_propagation(ctx):
        yield
