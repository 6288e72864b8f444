"""What a rank's recorded step depends on: the signature the layer store keys its models by
(cache/layers.py), and the relabelling of the one thing the signature leaves out that the
streams record (the sizes of the groups whose degree it drops).

A stored model is reused by every rank whose signature is equal, in any plan. The signature is
therefore built from what execution reads (mode/rank.py: `execute_rank`), field by field, not
from the task's text:

- the model spec (depth included: the memo keys its short task) and, for `file:` routing, a
  digest of the file (the path alone would keep a stale model after the file changed);
- training: dtype, optimizer, activation checkpointing, micro-batch, sequence, grad_sync,
  attention, routing. Not `global_batch` (execution reads the micro-batch count, which is in
  the signature) and not `compile` (a cost-model input: costmodel/kernels.py fuses chains when
  it prices them; execution is eager either way);
- parallel: every field, except that the replicate degree enters only as "replicated or not".
  Replicas run the same program whatever their number: FSDP2 / replicate choose DDP, HSDP or
  FSDP by whether dp_replicate > 1 (parallel/__init__.py: apply_data_parallel), grad_sync's
  `auto` rule asks the same (parallel/data_parallel.py: grad_sync_rule), and the gradient
  reduction's op and divide factors depend on the group sizes only through "is the data-
  parallel world 1" while the reduce dtype is fp32, which the mixed-precision policy fixes
  (torch's fsdp/_fully_shard/_fsdp_collectives.py: _get_gradient_divide_factors). What the
  degree does change is recorded in one field, the `group_size` of collectives on the
  dp_replicate group and on the default group ("world"): `relabel_groups` sets those to the
  rebuilt rank's degrees, and `groups_relabellable` refuses to store a model where they are
  not the recording layout's degrees (so the relabelling is exact by construction);
- the rank's place: its mesh coordinates without the dp_replicate one, not its rank number
  (the rank number of a class's first rank moves with every outer degree; the process group
  and the recorded streams only see coordinates, and p2p peers are group ranks);
- the micro-batch count and whether every micro-batch executes.

The cluster (nodes, GPUs per node, GPU model, prices, calibration) is not in a RankTask at
all: placement and hardware are cost-model inputs, priced at merge (plan.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from simdist.trace import RankTask, StepStreams

# The group dims whose size the signature leaves out: relabelled when a model is rebuilt.
RELABELLED_DIMS = ("dp_replicate", "world")
# Execution-irrelevant training fields (see the module docstring).
_TRAINING_IGNORED = ("global_batch", "compile")


def execution_signature(task: RankTask) -> str:
    """The text of everything `task`'s recorded step depends on (see the module docstring)."""
    training = task.training.model_dump(exclude=set(_TRAINING_IGNORED))
    parallel = task.parallel.model_dump()
    parallel["dp_replicate"] = "replicated" if parallel["dp_replicate"] > 1 else "single"
    position = {d: c for d, c in task.layout.coords(task.rank).items() if d != "dp_replicate"}
    fields = dict(model=repr(task.model), routing_file=_routing_digest(task), training=training,
                  parallel=parallel, ep=task.layout.ep, position=position,
                  num_microbatches=task.num_microbatches,
                  all_microbatches=task.all_microbatches)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)


def _routing_digest(task: RankTask) -> str | None:
    routing = str(getattr(task.model.args, "routing", "") or task.training.routing).strip()
    if not routing.startswith("file:"):
        return None
    try:
        return hashlib.blake2b(Path(routing[5:]).read_bytes(), digest_size=16).hexdigest()
    except OSError as e:  # execution will report it; the key only has to differ
        return f"unreadable: {e}"


def _degree(task: RankTask, dim: str) -> int:
    return task.layout.world_size if dim == "world" else task.layout.degree(dim)


def groups_relabellable(streams: StepStreams, task: RankTask) -> bool:
    """Every collective on a RELABELLED_DIMS group records that group's degree in `task`'s
    layout: then `relabel_groups` rebuilds exactly what another degree records."""
    return all(ev.group_size == _degree(task, ev.mesh_dim) for ev in streams.collectives
               if ev.mesh_dim in RELABELLED_DIMS)


def relabel_groups(streams: StepStreams, task: RankTask) -> StepStreams:
    """`streams` (rebuilt from a stored model, maybe recorded under other degrees of the
    dims the signature leaves out) with those groups' sizes as `task` records them."""
    sizes = {d: _degree(task, d) for d in RELABELLED_DIMS}
    streams.collectives = [
        ev._replace(group_size=sizes[ev.mesh_dim]) if ev.mesh_dim in sizes else ev
        for ev in streams.collectives]
    return streams



# --- the same on a summarized collectives table (a rebuilt rank kept by the layer store) -------
# Relabelling after `summarize` equals relabelling before: every collective of a relabelled dim
# records that dim's one degree (groups_relabellable), so its rows map one to one.

def table_relabellable(collectives: pa.Table, task: RankTask) -> bool:
    """groups_relabellable for a collectives table (schema.COLLECTIVES)."""
    dims, sizes = collectives["mesh_dim"].to_pylist(), collectives["group_size"].to_pylist()
    return all(size == _degree(task, dim) for dim, size in zip(dims, sizes)
               if dim in RELABELLED_DIMS)


def relabel_table(collectives: pa.Table, task: RankTask) -> pa.Table:
    """relabel_groups for a collectives table."""
    sizes = collectives["group_size"]
    for dim in RELABELLED_DIMS:
        sizes = pc.if_else(pc.equal(collectives["mesh_dim"], dim),
                           pa.scalar(_degree(task, dim), sizes.type), sizes)
    return collectives.set_column(collectives.schema.get_field_index("group_size"),
                                  collectives.schema.field("group_size"), sizes)
