"""The contracts every layer reads: what a worker is asked (RankTask), what one recorded step
did (StepStreams, in execution order, as named event records) and what a worker answers
(RankTrace). Tasks and traces pickle cheaply: the tables are Arrow, which Ray moves through
its object store without copies."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from simdist.config import ParallelConfig, TrainingConfig
from simdist.layout import MeshLayout

if TYPE_CHECKING:
    from simdist.families import ModelSpec


# --- step streams: the recorders' events ---------------------------------------------------------

class MemoryEvent(NamedTuple):
    """delta != 0: an allocation (+) or free (-) of live bytes; saved_delta != 0 (with delta
    == 0): a change of the bytes autograd keeps for backward (the activation curve)."""
    phase: str
    module: Any  # str; the layer memo puts a position-relative reference here while it works
    op: str
    delta: int
    saved_delta: int


class OpHead(NamedTuple):
    op: str
    phase: str
    module: Any
    weight: int  # how many micro-batches this execution stands for
    flops: int
    write_only: bool  # factories: they write their output and read nothing


class OpItem(NamedTuple):
    """One tensor of a kernel: an argument ("a", "shape:dtype", bytes) or an output ("o", "",
    bytes). Foreach ops (the optimizer's) carry one item per tensor of their lists."""
    role: str
    shape: str
    nbytes: int


class OpEvent(NamedTuple):
    head: OpHead
    items: tuple[OpItem, ...]


class CollectiveEvent(NamedTuple):
    op: str
    kind: str
    mesh_dim: str
    group_size: int
    bytes: int
    phase: str
    module: Any
    peer: int  # point-to-point: the peer's rank within the group; -1 for collectives
    weight: int


class KernelEvent(NamedTuple):
    """One entry of the kernel stream (mode/kernels.py): an op, a collective or a mark."""
    kind: str  # "op" | "coll" | "mark"
    phase: str
    module: Any
    stream: str  # ops: "compute" or an FSDP2 stream; collectives: their mesh dim
    # The event waited for: the `wait_back`-th event of module `wait_module` on stream
    # `wait_stream` counted back from this one (0: no wait; -1: it waits for every other
    # stream). Counted within one module and stream, so blocks the layer memo inserts between
    # the two change nothing.
    wait_module: Any
    wait_stream: str
    wait_back: int
    weight: int
    label: str  # marks: the schedule's action


class Boundary(NamedTuple):
    """A point of a pipeline schedule (an action's begin, end, enter or exit) and how many
    kernel and memory events were recorded before it (mode/kernels.py; the pipeline memo cuts
    the streams there)."""
    label: str
    kernels: int
    memory: int


STREAMS = ("memory", "ops", "collectives", "kernels")


def named_event(stream: str, plain: tuple) -> tuple:
    """An event of `stream` from its plain tuple form (as JSON gives it back)."""
    if stream == "memory":
        return MemoryEvent(*plain)
    if stream == "collectives":
        return CollectiveEvent(*plain)
    if stream == "kernels":
        return KernelEvent(*plain)
    head, items = plain
    return OpEvent(OpHead(*head), tuple(OpItem(*i) for i in items))


# Scalars of the step that are not events: live and saved bytes when recording starts (resident
# parameters, optimizer state, buffers) and the storage sizes read at the optimizer step.
SCALARS = ("initial_live", "initial_saved", "param_bytes", "grad_bytes", "optimizer_bytes",
           "executed_microbatches")


@dataclass
class StepStreams:
    memory: list[MemoryEvent] = field(default_factory=list)
    ops: list[OpEvent] = field(default_factory=list)
    collectives: list[CollectiveEvent] = field(default_factory=list)
    kernels: list[KernelEvent] = field(default_factory=list)
    scalars: dict[str, int] = field(default_factory=dict)
    # Not a stream of the step: where the schedule's actions lie in the streams.
    boundaries: list[Boundary] = field(default_factory=list)


# --- a rank's task and its trace ----------------------------------------------------------------

@dataclass(frozen=True)
class RankTask:
    """One rank to simulate: its place in the mesh, the model, and the config sections that
    decide its execution (never copies of their fields)."""
    rank: int
    layout: MeshLayout
    model: ModelSpec
    training: TrainingConfig
    parallel: ParallelConfig
    num_microbatches: int
    # Execute every micro-batch instead of the distinct ones (the rest repeat exactly).
    all_microbatches: bool = False
    # Rebuild deep stages from short ones (the layer memo) where it applies, and keep / reuse
    # the memo's models in this cache dir (None: no store).
    layer_memo: bool = True
    layer_cache_dir: str | None = None
    # Rebuild a pipeline step of many micro-batches from steps of a few (the pipeline memo,
    # mode/pipeline_memo.py) where it applies.
    pipeline_memo: bool = True
    # Rebuild this rank from another middle rank of its pipeline where both are simulated in
    # one run (mode/stage_share.py; the coordinator groups them).
    stage_sharing: bool = True

    def __post_init__(self) -> None:
        p = self.parallel
        if self.layout != MeshLayout.from_parallel(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp,
                                                   p.ep):
            raise ValueError(f"RankTask: layout {self.layout} is not the mesh of {p!r}")

    def with_parallel(self, **changes: Any) -> RankTask:
        return replace(self, parallel=self.parallel.model_copy(update=changes))


@dataclass(frozen=True)
class SymbolicDim:
    """A training dimension executed as a size symbol (mode/symbolic.py): its value is `period`
    x k, k a ShapeEnv symbol whose hint (the value the code's branches are taken at) is `hint`.
    `model_fields`: fields of the model's arguments that equal the dimension and follow it
    (Llama's max_seq_len, sized to training.seq_len)."""
    key: str  # "training.micro_batch" or "training.seq_len"
    hint: int
    period: int = 1
    model_fields: tuple[str, ...] = ()


class SizeGuard(NamedTuple):
    """A condition on k that the execution's branches assumed (torch's ShapeEnv guard)."""
    expr: Any  # a sympy relation in SIZE_SYMBOL
    where: str  # the code that made it (file:line)


SIZE_SYMBOL = "k"  # the name of k in a SymbolicTrace's expressions (sympy: integer, positive)


@dataclass
class SymbolicTrace:
    """One rank's step executed with a SymbolicDim: the memory stream (mode/memory.py) with
    every size a sympy expression in k (Integer where it does not depend on it), valid for
    every k that satisfies `guards`, lies in `k_range` and gives a micro-batch count per step in
    `microbatches` (the same program; see mode/step.py: microbatch_span)."""
    rank: int
    dim: SymbolicDim
    memory: list[MemoryEvent]
    scalars: dict[str, Any]  # StepStreams.scalars, as expressions
    guards: list[SizeGuard]
    k_range: tuple[int, int | None]  # what the ShapeEnv assumed of k (None: unbounded)
    microbatches: tuple[int, int | None]
    specialised: SizeGuard | None = None  # the guard that fixed k to its hint, if one did
    wall_s: float = 0.0


@dataclass
class RankTrace:
    rank: int
    peak_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    other_bytes: int
    peak_phase: str
    peak_module: str
    flops: int  # every executed FLOP of the step (all micro-batches, recompute included)
    model_flops: int  # 3 x forward FLOPs: the model-FLOPs convention (no recompute)
    hbm_bytes: int
    comm_bytes: int
    ops: pa.Table
    collectives: pa.Table
    memory: pa.Table
    kernels: pa.Table  # the kernel stream, in issue order (schema.KERNELS)
    executed_microbatches: int
    wall_s: float
    fake_cache: dict[str, int] = field(default_factory=dict)
    # The step's event streams: kept only for the layer memo's short steps, which a build
    # fits; dropped otherwise.
    streams: StepStreams | None = None
    # How this trace was obtained: "full" execution (memo not applicable or off), "fallback"
    # (memo tried, did not fit), "memo" (short stages executed), "memo-hit" (memo model read
    # from the layer store, nothing executed), "shared" (rebuilt from another middle rank of
    # the pipeline: mode/stage_share.py); blocks executed vs blocks on this rank.
    layer_memo: str = "full"
    blocks_executed: int = 0
    blocks_total: int = 0
    # How the pipeline step's micro-batches were obtained: "memo" (the step executed with a few
    # micro-batches, fitted, verified, rebuilt), "memo-hit" (its model read from the layer
    # store), "fallback" (memo tried, did not fit: executed in full), "full" (not applicable:
    # no pipeline, too few micro-batches to gain, or nothing executed), "off" (turned off:
    # simulation.pipeline_memo), "shared" (rebuilt from another middle rank of the pipeline:
    # mode/stage_share.py).
    pipeline_memo: str = "full"
