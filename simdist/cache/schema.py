"""Arrow schemas of the shared cache: FakeTensorMode dispatch-cache entries and op cost rows.

Pure pyarrow (no torch import): the store and the cache service actor only move tables.

Dispatch entries (one row per `_DispatchCacheKey -> _DispatchCacheEntry` of
`torch._subclasses.fake_tensor.FakeTensorMode.cache`):

* identity: `key_id` (blake2b-128 of the canonical encoding of the key; the primary key of the
  store and the "op key" of cost rows), `op` ("aten::mm") + `overload` ("default");
* the key's scalar context (`_cache_key`'s prefix): `default_dtype`, `default_device`,
  `inference_mode`, `is_tracing` (the shape-env settings slot is always None: keys made under a
  ShapeEnv are symbolic and not stored);
* `args`: the key's flattened argument stream (`_prep_args_for_hash`) as typed tokens, with every
  fake tensor replaced by a TENSOR token pointing into `inputs`;
* `inputs`: the metadata of each tensor argument as columns (TensorMetadata's fields: dtype,
  shape, stride, device, layout, memory_format, storage_offset, storage_bytes, flags);
* the entry: `kind` "valid" | "bypass"; for bypass entries the `bypass_reason`; for valid ones
  `is_output_tuple` and `outputs`, one struct per output (`inplace_idx`: the op returned this
  argument; `view_idx`: a view aliasing this argument's storage; `metadata`: the synthesised
  tensor; `constant`: a non-tensor output, int / bool / None);
* bookkeeping: `created`, `last_used` (unix seconds, drives LRU eviction), `uses`.

Cost rows (keyed by `key_id` x `hardware`): flops, bytes read / written, the kernel model's estimate
and an optional measured time (for calibration).

Both tables carry in their schema metadata the schema version and the torch version that made
them; a reader ignores a table whose versions differ from its own (keys and entries are torch
internals: a different torch may hash, flatten or synthesise differently).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# Schema metadata keys.
META_SCHEMA = b"simdist.cache.schema_version"
META_TORCH = b"simdist.cache.torch_version"
META_KIND = b"simdist.cache.kind"  # "entries" | "costs"

# Token kinds in `args` (see codec.py).
TOK_TYPE, TOK_STR, TOK_INT, TOK_BOOL, TOK_FLOAT, TOK_NONE = 0, 1, 2, 3, 4, 5
TOK_DTYPE, TOK_DEVICE, TOK_LAYOUT, TOK_MEMFMT, TOK_TENSOR = 6, 7, 8, 9, 10

# Output constant kinds.
CONST_UNSET, CONST_NONE, CONST_INT, CONST_BOOL = 0, 1, 2, 3

TOKEN = pa.struct([
    ("kind", pa.int8()),
    ("name", pa.string()),  # TYPE: qualified type name; STR: the string; DTYPE/...: str(value)
    ("i", pa.int64()),  # INT / BOOL value; TENSOR: index into `inputs`
    ("f", pa.float64()),  # FLOAT value
])

# Field names and order of torch's TensorMetadata (checked against torch at import of codec.py).
TENSOR_FIELDS = ("dtype", "shape", "stride", "device", "layout", "memory_format",
                 "storage_offset", "storage_bytes", "requires_grad", "is_quantized", "is_conj",
                 "is_neg", "is_inference", "is_sparse", "is_coalesced", "dense_dim", "sparse_dim")

TENSOR = pa.struct([
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("stride", pa.list_(pa.int64())),
    ("device", pa.string()),
    ("layout", pa.string()),
    ("memory_format", pa.string()),  # null: not contiguous in any format
    ("storage_offset", pa.int64()),
    ("storage_bytes", pa.int64()),  # null: no storage (sparse)
    ("requires_grad", pa.bool_()),
    ("is_quantized", pa.bool_()),
    ("is_conj", pa.bool_()),
    ("is_neg", pa.bool_()),
    ("is_inference", pa.bool_()),
    ("is_sparse", pa.bool_()),
    ("is_coalesced", pa.bool_()),
    ("dense_dim", pa.int32()),
    ("sparse_dim", pa.int32()),
])

OUTPUT = pa.struct([
    ("inplace_idx", pa.int32()),
    ("view_idx", pa.int32()),
    ("metadata", TENSOR),
    ("constant", pa.int8()),  # CONST_*
    ("constant_int", pa.int64()),
])

ENTRY_FIELDS = [
    pa.field("key_id", pa.string(), nullable=False),
    pa.field("op", pa.string(), nullable=False),
    pa.field("overload", pa.string(), nullable=False),
    pa.field("default_dtype", pa.string()),
    pa.field("default_device", pa.string()),
    pa.field("inference_mode", pa.bool_()),
    pa.field("is_tracing", pa.bool_()),
    pa.field("args", pa.list_(TOKEN)),
    pa.field("inputs", pa.list_(TENSOR)),
    pa.field("kind", pa.string(), nullable=False),  # "valid" | "bypass"
    pa.field("bypass_reason", pa.string()),
    pa.field("is_output_tuple", pa.bool_()),
    pa.field("outputs", pa.list_(OUTPUT)),
    pa.field("created", pa.float64()),
    pa.field("last_used", pa.float64()),
    pa.field("uses", pa.int64()),
]

COST_FIELDS = [
    pa.field("key_id", pa.string(), nullable=False),
    pa.field("hardware", pa.string(), nullable=False),
    pa.field("op", pa.string()),
    pa.field("flops", pa.int64()),
    pa.field("bytes_read", pa.int64()),
    pa.field("bytes_written", pa.int64()),
    pa.field("est_time_s", pa.float64()),
    pa.field("measured_time_s", pa.float64()),  # null until calibrated on real hardware
    pa.field("updated", pa.float64()),
]


def _metadata(kind: str, torch_version: str) -> dict[bytes, bytes]:
    return {META_SCHEMA: str(SCHEMA_VERSION).encode(), META_TORCH: torch_version.encode(),
            META_KIND: kind.encode()}


def entries_schema(torch_version: str) -> pa.Schema:
    return pa.schema(ENTRY_FIELDS, metadata=_metadata("entries", torch_version))


def costs_schema(torch_version: str) -> pa.Schema:
    return pa.schema(COST_FIELDS, metadata=_metadata("costs", torch_version))


def table_versions(schema: pa.Schema) -> tuple[str | None, str | None, str | None]:
    """(kind, schema version, torch version) from a table's metadata; None where absent."""
    md = schema.metadata or {}

    def get(k: bytes) -> str | None:
        v = md.get(k)
        return v.decode(errors="replace") if v is not None else None

    return get(META_KIND), get(META_SCHEMA), get(META_TORCH)


def empty_entries(torch_version: str) -> pa.Table:
    return entries_schema(torch_version).empty_table()


def empty_costs(torch_version: str) -> pa.Table:
    return costs_schema(torch_version).empty_table()
