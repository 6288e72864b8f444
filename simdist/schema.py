"""Arrow schemas of every table simdist writes, defined once. Bytes are bytes, times seconds."""

from __future__ import annotations

import pyarrow as pa

from simdist.layout import COORD_DIMS

OPS = pa.schema([
    ("op", pa.string()), ("phase", pa.string()), ("module", pa.string()), ("shapes", pa.string()),
    ("count", pa.int64()), ("flops", pa.int64()), ("bytes", pa.int64()),
])

COLLECTIVES = pa.schema([
    ("op", pa.string()), ("kind", pa.string()), ("mesh_dim", pa.string()),
    ("group_size", pa.int32()), ("bytes", pa.int64()), ("phase", pa.string()),
    ("module", pa.string()), ("peer", pa.int32()), ("count", pa.int64()),
])

MEMORY = pa.schema([
    ("seq", pa.int64()), ("phase", pa.string()), ("module", pa.string()), ("op", pa.string()),
    ("delta", pa.int64()), ("live", pa.int64()),
])

# The kernel stream of a class's step in issue order (simdist/mode/kernels.py): `row` is the
# event's row in the ops table (kind "op") or the collectives table ("coll"), -1 for marks;
# `wait` >= 0: the index of the event this one waits for; WAIT_NONE: none; WAIT_ALL: every
# other stream (an op reading the results of several).
WAIT_NONE, WAIT_ALL = -1, -2
KERNELS = pa.schema([
    ("kind", pa.string()), ("phase", pa.string()), ("module", pa.string()),
    ("stream", pa.string()), ("wait", pa.int32()), ("weight", pa.int64()),
    ("label", pa.string()), ("row", pa.int32()),
])

# Columns added when a class trace is written into the run directory.
CLASS_COLUMNS = [("class_id", pa.int32())]
OPS_OUT = pa.schema(CLASS_COLUMNS + list(OPS) + [("est_time_s", pa.float64())])
COLLECTIVES_OUT = pa.schema(CLASS_COLUMNS + list(COLLECTIVES) + [("est_time_s", pa.float64())])
MEMORY_OUT = pa.schema(CLASS_COLUMNS + list(MEMORY))
KERNELS_OUT = pa.schema(CLASS_COLUMNS + list(KERNELS) + [("est_time_s", pa.float64())])


RANKS = pa.schema(
    [("rank", pa.int32()), ("node", pa.int32()), ("local_rank", pa.int32())]
    + [(d, pa.int32()) for d in COORD_DIMS]
    + [("class_id", pa.int32())]
    + [(c, pa.int64()) for c in ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes",
                                 "activation_bytes", "other_bytes", "flops", "hbm_bytes",
                                 "comm_bytes")]
    + [(c, pa.float64()) for c in ("compute_s", "comm_s", "exposed_comm_s", "bubble_s", "step_s")]
    + [("fits", pa.bool_())]
)


def table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
