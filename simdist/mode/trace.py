"""What a worker is asked (RankTask) and what it answers (RankTrace). Both pickle cheaply: the
tables are Arrow, which Ray moves through its object store without copies."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from simdist.models import ModelSpec
from simdist.mode.streams import StepStreams
from simdist.parallel.mesh import MeshLayout


@dataclass(frozen=True)
class RankTask:
    rank: int
    layout: MeshLayout
    model: ModelSpec
    seq_len: int
    micro_batch: int
    num_microbatches: int
    dtype: str = "bf16"
    optimizer: str = "adamw"
    activation_checkpointing: str = "none"
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2
    pp_layers: tuple[int, ...] | None = None
    zero_stage: int = 3
    grad_sync: str = "auto"  # training.grad_sync (simdist.parallel.data_parallel.grad_sync_rule)
    # Execute every micro-batch instead of the first two (the rest repeat the second exactly).
    all_microbatches: bool = False
    # Rebuild deep stages from short ones (mode/layer_memo.py) where the memo applies, and
    # keep / reuse the memo's models in this cache dir (simdist/cache/layers.py; None: no store).
    layer_memo: bool = True
    layer_cache_dir: str | None = None


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
    executed_microbatches: int
    wall_s: float
    fake_cache: dict[str, int] = field(default_factory=dict)
    # The step's event streams (mode/streams.py): kept only for the layer memo's short steps
    # (execute_unit(keep_streams=True)), which the coordinator hands to a build; dropped
    # otherwise.
    streams: StepStreams | None = None
    # How this trace was obtained: "full" execution (memo not applicable or off), "fallback"
    # (memo tried, did not fit), "memo" (short stages executed), "memo-hit" (memo model read
    # from the layer store, nothing executed); blocks executed vs blocks on this rank.
    layer_memo: str = "full"
    blocks_executed: int = 0
    blocks_total: int = 0
