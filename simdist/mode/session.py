"""A rank session: this process plays rank r of W under torch's fake process group, with DTensor
sharding propagation fenced off from the recorders (it runs ops on global-shape fakes that no
GPU would run)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

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


_session_ids = itertools.count(1)


def _group_map() -> dict[str, tuple[int, ...]]:
    """Every process group of this session: name -> its global ranks."""
    world = dist.distributed_c10d._world
    return {name: tuple(sorted(world.pg_group_ranks.get(pg, {}))) for pg, name
            in world.pg_names.items()}


@dataclass
class _Shared:
    token: int
    groups: dict[str, tuple[int, ...]] | None = None  # at the end of the first session


# key -> the mesh token its sessions share (see RankSession)
_shared: dict[Hashable, _Shared] = {}


@dataclass
class RankSession:
    """Which DeviceMesh token this session stamps (see `distinct_meshes`). Sessions of one
    `key` (the same rank of the same mesh layout: the memo's short steps of one rank class)
    share one token, so DTensor's caches keyed by their meshes (sharding propagation,
    redistribution) carry over from one to the next instead of being recomputed per session.
    That is sound where a mesh of an earlier session names the same process groups as this
    session's equal mesh: the group names (counted from 0 in each session) resolve to groups of
    the same ranks. `close` checks it (every group of this session, by name and ranks, as in
    the key's first session); where it fails, `consistent` is False, the key gets a new token
    and the caller executes the session again with its own meshes. key None: a token of its
    own."""
    key: Hashable | None = None
    token: int = 0
    consistent: bool = True

    def __post_init__(self) -> None:
        shared = _shared.get(self.key) if self.key is not None else None
        if shared is None:
            shared = _Shared(-next(_session_ids))
            if self.key is not None:
                _shared[self.key] = shared
        self.token = shared.token

    def _entry(self) -> _Shared | None:
        shared = _shared.get(self.key) if self.key is not None else None
        return shared if shared is not None and shared.token == self.token else None

    def close(self) -> None:
        """Called before the process group is destroyed."""
        if (shared := self._entry()) is None:
            return
        groups = _group_map()
        if shared.groups is None:
            shared.groups = groups
        elif groups != shared.groups:
            self.consistent = False
            del _shared[self.key]

    def abandon(self) -> None:
        """A session that raised: its groups were never checked, so no later session may take
        what it left in the caches."""
        if self._entry() is not None:
            del _shared[self.key]


@contextlib.contextmanager
def distinct_meshes(token: int | None = None) -> Iterator[None]:
    """Make this session's DeviceMeshes unequal to every earlier session's (but those that
    share its `token`, see RankSession; None: a new one).

    DeviceMesh equality and hash ignore the rank and the process-group names (they compare
    layout, device and dim names, plus a thread id used only by the threaded backend), and
    DTensor caches sharding and redistribution decisions keyed by specs that hold meshes. A
    process simulating a second rank of the same shape would get the first rank's meshes back
    from those caches, with process groups that no longer exist. Stamping each session's
    meshes with its own id (in the thread-id slot the fake backend leaves unused) keeps the
    caches correct without clearing them."""
    from torch.distributed.device_mesh import DeviceMesh

    if token is None:
        token = -next(_session_ids)
    orig = DeviceMesh.__init__

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        orig(self, *args, **kwargs)
        if getattr(self, "_thread_id", None) is None:
            self._thread_id = token

    DeviceMesh.__init__ = init
    try:
        yield
    finally:
        DeviceMesh.__init__ = orig


@contextlib.contextmanager
def own_groups_only() -> Iterator[None]:
    """Let DeviceMesh create only the process groups this rank belongs to.

    Real ranks must all call `new_group` for every subgroup of every mesh dimension (it is
    collective), and a rank outside a subgroup gets GroupMember.NON_GROUP_MEMBER back. One
    simulated rank needs only its own groups, so the others are answered that way without
    creating them. Otherwise a session's cost grows with the world size: 1024-way FSDP has
    four size-1 mesh dims, each with 1024 singleton groups (4096 `new_group` calls, 0.045 s
    per session vs 0.003 s at 8 GPUs)."""
    import torch.distributed.device_mesh as device_mesh

    orig = device_mesh.new_group

    def new_group(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ranks = kwargs["ranks"] if "ranks" in kwargs else (args[0] if args else None)
        if ranks is not None and dist.get_rank() not in ranks:
            return dist.GroupMember.NON_GROUP_MEMBER
        return orig(*args, **kwargs)

    device_mesh.new_group = new_group
    try:
        yield
    finally:
        device_mesh.new_group = orig


@contextlib.contextmanager
def rank_session(rank: int, world_size: int, ctx: StepContext,
                 key: Hashable | None = None) -> Iterator[RankSession]:
    """`key`: see RankSession (None: meshes of this session's own)."""
    session = RankSession(key)
    with distinct_meshes(session.token), own_groups_only(), \
            fake_process_group(rank, world_size), exclude_sharding_propagation(ctx):
        try:
            yield session
        except BaseException:
            session.abandon()
            raise
        session.close()
