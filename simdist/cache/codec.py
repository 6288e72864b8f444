"""FakeTensorMode dispatch-cache entries <-> Arrow rows (schema in schema.py).

A `_DispatchCacheKey` is a flat tuple built by `FakeTensorMode._cache_key`:

    (op, default dtype, default device, inference mode, shape-env settings, is_tracing,
     *flattened args)

where `_prep_args_for_hash` flattens every argument as `type(arg), arg` for scalars,
`type(c), "length_n", *items` for lists / tuples / dicts (a dict's keys then its values), and a
fake tensor as the fields of its TensorMetadata in order (shape and stride are themselves
flattened as `torch.Size|tuple, "length_n", int, v, ...`). The grammar is self-delimiting (a
tensor starts with a bare `torch.dtype`; a scalar dtype is always preceded by its type), so a key
parses into typed tokens plus one metadata row per tensor, and back.

Keys hold `OpOverload` objects and hash per process (type objects hash by id, strings by the
process's seed): the op is stored by qualified name + overload and keys are rebuilt, and hashed,
in the reading process.

Faithfulness: `encode_items` decodes every row it produced and keeps it only if the rebuilt key
equals the original key and the rebuilt entry equals the original entry; everything it cannot
represent exactly (SymInts / ShapeEnv keys, opaque objects such as ScriptObjects or
GraphModules, higher-order ops, NaN scalars, ints beyond int64) is skipped and counted by reason,
never approximated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import torch
from torch._subclasses import fake_tensor as ft

from simdist.cache import schema as S

TORCH_VERSION = torch.__version__

_FIELDS_MATCH = tuple(f.name for f in dataclasses.fields(ft.TensorMetadata)) == S.TENSOR_FIELDS

# Every class that may appear as a type token, by a stable name.
_TYPES: dict[str, type] = {
    "builtins.int": int, "builtins.float": float, "builtins.bool": bool, "builtins.str": str,
    "builtins.NoneType": type(None), "builtins.tuple": tuple, "builtins.list": list,
    "builtins.dict": dict, "torch.Size": torch.Size, "torch.dtype": torch.dtype,
    "torch.device": torch.device, "torch.layout": torch.layout,
    "torch.memory_format": torch.memory_format,
}
_TYPE_NAMES: dict[type, str] = {t: n for n, t in _TYPES.items()}
_SEQ_TYPES = (tuple, list, torch.Size)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class Unencodable(Exception):
    """This entry cannot be represented exactly; `reason` is counted, the entry skipped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Scalars


def _opaque(obj: object) -> Unencodable:
    name = obj.__qualname__ if isinstance(obj, type) else type(obj).__qualname__
    if "Sym" in name or "Backref" in name:
        return Unencodable("symbolic shape")
    return Unencodable(f"opaque object: {name}")


def _int(v: object) -> int:
    if type(v) is not int:
        raise _opaque(v)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise Unencodable("int beyond int64")
    return v


_ENUM_NAMES: dict[object, str] = {}


def _enum_name(v: object) -> str:
    """"float32" for torch.float32 (dtypes, layouts, memory formats: hashable singletons)."""
    name = _ENUM_NAMES.get(v)
    if name is None:
        name = _ENUM_NAMES[v] = str(v).removeprefix("torch.")
    return name


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Encoding allocates many small objects; after a simulation the heap is large and the
    cyclic GC's full passes would cost more than the encoding itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _token(v: object) -> tuple[int, str | None, int | None, float | None]:
    """One raw key element -> (kind, name, i, f)."""
    if isinstance(v, type):
        name = _TYPE_NAMES.get(v)
        if name is None:
            raise _opaque(v)
        return (S.TOK_TYPE, name, None, None)
    t = type(v)
    if t is str:
        return (S.TOK_STR, v, None, None)
    if t is bool:
        return (S.TOK_BOOL, None, int(v), None)
    if t is int:
        return (S.TOK_INT, None, _int(v), None)
    if t is float:
        if math.isnan(v):  # NaN != NaN: a key holding one never hits
            raise Unencodable("NaN scalar")
        return (S.TOK_FLOAT, None, None, v)
    if v is None:
        return (S.TOK_NONE, None, None, None)
    if t is torch.dtype:
        return (S.TOK_DTYPE, _enum_name(v), None, None)
    if t is torch.device:
        return (S.TOK_DEVICE, str(v), None, None)
    if t is torch.layout:
        return (S.TOK_LAYOUT, _enum_name(v), None, None)
    if t is torch.memory_format:
        return (S.TOK_MEMFMT, _enum_name(v), None, None)
    raise _opaque(v)


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise Unencodable(f"unknown dtype {name}")
    return d


def _layout(name: str) -> torch.layout:
    v = getattr(torch, name, None)
    if not isinstance(v, torch.layout):
        raise Unencodable(f"unknown layout {name}")
    return v


def _memfmt(name: str) -> torch.memory_format:
    v = getattr(torch, name, None)
    if not isinstance(v, torch.memory_format):
        raise Unencodable(f"unknown memory format {name}")
    return v


def _value(tok: tuple | dict) -> object:
    kind, name, i, f = tok if isinstance(tok, tuple) else (tok["kind"], tok["name"], tok["i"], tok["f"])
    if kind == S.TOK_TYPE:
        try:
            return _TYPES[name]
        except KeyError:
            raise Unencodable(f"unknown type {name}") from None
    if kind == S.TOK_STR:
        return name
    if kind == S.TOK_INT:
        return int(i)
    if kind == S.TOK_BOOL:
        return bool(i)
    if kind == S.TOK_FLOAT:
        return float(f)
    if kind == S.TOK_NONE:
        return None
    if kind == S.TOK_DTYPE:
        return _dtype(name)
    if kind == S.TOK_DEVICE:
        return torch.device(name)
    if kind == S.TOK_LAYOUT:
        return _layout(name)
    if kind == S.TOK_MEMFMT:
        return _memfmt(name)
    raise Unencodable(f"unknown token kind {kind}")


# ---------------------------------------------------------------------------------------------
# Tensor metadata


def _int_seq(t: tuple, pos: int, seq_type: type) -> tuple[list[int], int]:
    """`seq_type, "length_n", int, v0, int, v1, ...` starting at t[pos]."""
    if pos + 1 >= len(t) or t[pos] is not seq_type or type(t[pos + 1]) is not str:
        raise Unencodable("unparsed key")
    n = int(t[pos + 1].removeprefix("length_"))
    pos += 2
    out = []
    for _ in range(n):
        if pos + 1 >= len(t) or t[pos] is not int:
            raise _opaque(t[pos] if pos < len(t) else None)
        out.append(_int(t[pos + 1]))
        pos += 2
    return out, pos


def _opt(v: object, typ: type) -> Any:
    if v is None:
        return None
    if type(v) is not typ:
        raise _opaque(v)
    return v


def _meta_row(dtype, shape, stride, device, layout, memory_format, storage_offset,  # noqa: ANN001
              storage_bytes, requires_grad, is_quantized, is_conj, is_neg, is_inference,
              is_sparse, is_coalesced, dense_dim, sparse_dim) -> dict:
    if type(dtype) is not torch.dtype or type(device) is not torch.device \
            or type(layout) is not torch.layout:
        raise Unencodable("unparsed key")
    flags = (requires_grad, is_quantized, is_conj, is_neg, is_inference, is_sparse)
    if any(type(b) is not bool for b in flags):
        raise Unencodable("unparsed key")
    return dict(
        dtype=_enum_name(dtype), shape=[_int(v) for v in shape], stride=[_int(v) for v in stride],
        device=str(device), layout=_enum_name(layout),
        memory_format=None if memory_format is None else _enum_name(_opt(memory_format, torch.memory_format)),
        storage_offset=_int(storage_offset),
        storage_bytes=None if storage_bytes is None else _int(storage_bytes),
        requires_grad=requires_grad, is_quantized=is_quantized, is_conj=is_conj, is_neg=is_neg,
        is_inference=is_inference, is_sparse=is_sparse, is_coalesced=_opt(is_coalesced, bool),
        dense_dim=_opt(dense_dim, int), sparse_dim=_opt(sparse_dim, int),
    )


def _parse_tensor(t: tuple, pos: int) -> tuple[dict, int]:
    dtype = t[pos]
    shape, pos = _int_seq(t, pos + 1, torch.Size)
    stride, pos = _int_seq(t, pos, tuple)
    rest = t[pos:pos + 14]
    if len(rest) != 14:
        raise Unencodable("unparsed key")
    return _meta_row(dtype, shape, stride, *rest), pos + 14


def _meta_tokens(m: dict) -> list:
    """A metadata row -> the flat key elements `TensorMetadata._flatten_into` produces."""
    out: list = [_dtype(m["dtype"]), torch.Size, f"length_{len(m['shape'])}"]
    for v in m["shape"]:
        out += [int, v]
    out += [tuple, f"length_{len(m['stride'])}"]
    for v in m["stride"]:
        out += [int, v]
    mf = m["memory_format"]
    out += [torch.device(m["device"]), _layout(m["layout"]), None if mf is None else _memfmt(mf),
            m["storage_offset"], m["storage_bytes"], m["requires_grad"], m["is_quantized"],
            m["is_conj"], m["is_neg"], m["is_inference"], m["is_sparse"], m["is_coalesced"],
            m["dense_dim"], m["sparse_dim"]]
    return out


def _output_meta_row(md: ft.TensorMetadata) -> dict:
    return _meta_row(*(getattr(md, f) for f in S.TENSOR_FIELDS))


def _output_meta(m: dict) -> ft.TensorMetadata:
    mf = m["memory_format"]
    return ft.TensorMetadata(
        dtype=_dtype(m["dtype"]), shape=tuple(m["shape"]), stride=tuple(m["stride"]),
        device=torch.device(m["device"]), layout=_layout(m["layout"]),
        memory_format=None if mf is None else _memfmt(mf), storage_offset=m["storage_offset"],
        storage_bytes=m["storage_bytes"], requires_grad=m["requires_grad"],
        is_quantized=m["is_quantized"], is_conj=m["is_conj"], is_neg=m["is_neg"],
        is_inference=m["is_inference"], is_sparse=m["is_sparse"],
        is_coalesced=m["is_coalesced"], dense_dim=m["dense_dim"], sparse_dim=m["sparse_dim"],
    )


# ---------------------------------------------------------------------------------------------
# Keys


def _op_names(func: object) -> tuple[str, str]:
    if not isinstance(func, torch._ops.OpOverload):
        raise Unencodable("higher-order op")
    return func._schema.name, func._overloadname


def resolve_op(qualname: str, overload: str) -> torch._ops.OpOverload:
    ns, _, name = qualname.partition("::")
    try:
        op = getattr(getattr(getattr(torch.ops, ns), name), overload)
    except (AttributeError, RuntimeError):
        raise Unencodable("unknown op") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise Unencodable("unknown op")
    return op


def encode_key(key: ft._DispatchCacheKey) -> dict:
    t = key.key
    if len(t) < 6:
        raise Unencodable("unparsed key")
    op, overload = _op_names(t[0])
    default_dtype, default_device, inference, settings, tracing = t[1:6]
    if settings is not None:
        raise Unencodable("shape env (symbolic run)")
    if type(default_dtype) is not torch.dtype or type(default_device) is not str \
            or type(inference) is not bool or type(tracing) is not bool:
        raise Unencodable("unparsed key")
    tokens: list[tuple] = []
    inputs: list[dict] = []
    pos = 6
    while pos < len(t):
        v = t[pos]
        if isinstance(v, type):
            if pos + 1 >= len(t):
                raise Unencodable("unparsed key")
            tokens.append(_token(v))
            tokens.append(_token(t[pos + 1]))
            pos += 2
        elif type(v) is torch.dtype:
            meta, pos = _parse_tensor(t, pos)
            tokens.append((S.TOK_TENSOR, None, len(inputs), None))
            inputs.append(meta)
        elif type(v) is int and pos == 6:
            raise Unencodable("symbolic shape")  # the epoch: the key had symbols
        else:
            raise _opaque(v)
    return dict(op=op, overload=overload, default_dtype=_enum_name(default_dtype),
                default_device=default_device, inference_mode=inference, is_tracing=tracing,
                args=tokens, inputs=inputs)


def key_id(key: ft._DispatchCacheKey) -> str:
    """Stable id of an encodable key: the store's primary key and the cost rows' op key. Every
    element of an encodable key has a process-independent repr (ops, whitelisted types, dtypes,
    devices, layouts, plain scalars), so the repr of the key tuple is canonical."""
    return hashlib.blake2b(repr(key.key).encode(), digest_size=16).hexdigest()


def decode_key(row: dict, op: torch._ops.OpOverload | None = None) -> ft._DispatchCacheKey:
    func = op if op is not None else resolve_op(row["op"], row["overload"])
    out: list = [func, _dtype(row["default_dtype"]), row["default_device"],
                 bool(row["inference_mode"]), None, bool(row["is_tracing"])]
    inputs = row["inputs"]
    for tok in row["args"]:
        kind = tok[0] if isinstance(tok, tuple) else tok["kind"]
        if kind == S.TOK_TENSOR:
            idx = tok[2] if isinstance(tok, tuple) else tok["i"]
            out += _meta_tokens(inputs[idx])
        else:
            out.append(_value(tok))
    return ft._DispatchCacheKey(tuple(out))


# ---------------------------------------------------------------------------------------------
# Entries


def encode_entry(entry: object) -> dict:
    if isinstance(entry, ft._DispatchCacheBypassEntry):
        return dict(kind="bypass", bypass_reason=entry.reason, is_output_tuple=None, outputs=None)
    if not isinstance(entry, ft._DispatchCacheValidEntry):
        raise Unencodable(f"entry type {type(entry).__qualname__}")
    outputs = []
    for info in entry.output_infos:
        c = info.constant_value
        if c is ft.SingletonConstant:
            const, cint = S.CONST_UNSET, None
        elif c is None:
            const, cint = S.CONST_NONE, None
        elif type(c) is bool:
            const, cint = S.CONST_BOOL, int(c)
        elif type(c) is int:
            const, cint = S.CONST_INT, _int(c)
        else:
            raise _opaque(c)
        outputs.append(dict(
            inplace_idx=info.inplace_idx, view_idx=info.view_idx,
            metadata=None if info.metadata is None else _output_meta_row(info.metadata),
            constant=const, constant_int=cint,
        ))
    return dict(kind="valid", bypass_reason=None, is_output_tuple=bool(entry.is_output_tuple),
                outputs=outputs)


def decode_entry(row: dict) -> object:
    if row["kind"] == "bypass":
        return ft._DispatchCacheBypassEntry(row["bypass_reason"])
    if row["kind"] != "valid":
        raise Unencodable(f"entry kind {row['kind']}")
    infos = []
    for o in row["outputs"]:
        const = o["constant"]
        if const == S.CONST_UNSET:
            c: object = ft.SingletonConstant
        elif const == S.CONST_NONE:
            c = None
        elif const == S.CONST_BOOL:
            c = bool(o["constant_int"])
        elif const == S.CONST_INT:
            c = int(o["constant_int"])
        else:
            raise Unencodable(f"constant kind {const}")
        infos.append(ft._DispatchCacheEntryOutputInfo(
            inplace_idx=o["inplace_idx"], view_idx=o["view_idx"],
            metadata=None if o["metadata"] is None else _output_meta(o["metadata"]),
            constant_value=c,
        ))
    return ft._DispatchCacheValidEntry(output_infos=tuple(infos),
                                       is_output_tuple=bool(row["is_output_tuple"]))


# ---------------------------------------------------------------------------------------------
# Tables


def encode_item(key: ft._DispatchCacheKey, entry: object, now: float | None = None) -> dict:
    """One cache item -> one row (dict), verified to decode to an equal key and entry."""
    if not _FIELDS_MATCH:
        raise Unencodable("TensorMetadata fields changed in this torch")
    row = encode_key(key)
    row.update(encode_entry(entry))
    if decode_key(row, key.key[0]) != key or decode_entry(row) != entry:
        raise Unencodable("round trip mismatch")
    row["key_id"] = key_id(key)
    now = time.time() if now is None else now
    row["created"] = row["last_used"] = now
    row["uses"] = 0
    return row


def encode_items(items: Iterable[tuple[ft._DispatchCacheKey, object]], now: float | None = None,
                 ) -> tuple[list[dict], dict[ft._DispatchCacheKey, str], Counter]:
    """Rows, the key_id of each encoded key, and skipped entries counted by reason."""
    rows: list[dict] = []
    ids: dict[ft._DispatchCacheKey, str] = {}
    skipped: Counter = Counter()
    now = time.time() if now is None else now
    for key, entry in items:
        try:
            row = encode_item(key, entry, now)
        except Unencodable as e:
            skipped[e.reason] += 1
            continue
        ids[key] = row["key_id"]
        rows.append(row)
    return rows, ids, skipped


def _arrow_row(row: dict) -> dict:
    return {**row, "args": [dict(kind=k, name=n, i=i, f=f) for k, n, i, f in row["args"]]}


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([_arrow_row(r) for r in rows],
                                schema=S.entries_schema(TORCH_VERSION))


def encode_cache(cache: dict | None = None, now: float | None = None) -> tuple[pa.Table, Counter]:
    """A whole dispatch cache (default: FakeTensorMode.cache) -> (Arrow table, skipped)."""
    cache = ft.FakeTensorMode.cache if cache is None else cache
    rows, _, skipped = encode_items(list(cache.items()), now)
    return rows_to_table(rows), skipped


def decode_table(table: pa.Table) -> tuple[list[tuple[str, ft._DispatchCacheKey, object]], Counter]:
    """Arrow rows -> [(key_id, key, entry)] rebuilt in this process, and skipped by reason."""
    out = []
    skipped: Counter = Counter()
    ops: dict[tuple[str, str], torch._ops.OpOverload] = {}
    cols = ["key_id", "op", "overload", "default_dtype", "default_device", "inference_mode",
            "is_tracing", "args", "inputs", "kind", "bypass_reason", "is_output_tuple", "outputs"]
    for row in table.select(cols).to_pylist():
        try:
            name = (row["op"], row["overload"])
            op = ops.get(name)
            if op is None:
                op = ops[name] = resolve_op(*name)
            out.append((row["key_id"], decode_key(row, op), decode_entry(row)))
        except Unencodable as e:
            skipped[e.reason] += 1
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            skipped[f"undecodable: {type(e).__name__}"] += 1
    return out, skipped


def install(decoded: Iterable[tuple[str, ft._DispatchCacheKey, object]],
            cache: dict | None = None) -> int:
    """Put decoded entries into FakeTensorMode's cache (existing entries win); returns how many
    were added."""
    cache = ft.FakeTensorMode.cache if cache is None else cache
    n = 0
    for _, key, entry in decoded:
        if key not in cache:
            cache[key] = entry
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Rebuilding the arguments a key describes (cost rows, validation)


class _Rebuild:
    """Turn a key's flat argument stream back into (args, kwargs), making a tensor per metadata
    run with `make(meta_row)`."""

    def __init__(self, key: ft._DispatchCacheKey, make: Any) -> None:
        self.t = key.key
        self.make = make

    def item(self, pos: int) -> tuple[object, int]:
        t = self.t
        v = t[pos]
        if isinstance(v, type):
            if v in _SEQ_TYPES or v is dict:
                n = int(t[pos + 1].removeprefix("length_"))
                pos += 2
                if v is dict:
                    keys, vals = [], []
                    for _ in range(n):
                        k, pos = self.item(pos)
                        keys.append(k)
                    for _ in range(n):
                        x, pos = self.item(pos)
                        vals.append(x)
                    return dict(zip(keys, vals)), pos
                items = []
                for _ in range(n):
                    x, pos = self.item(pos)
                    items.append(x)
                return v(items), pos
            return t[pos + 1], pos + 2
        if type(v) is torch.dtype:
            meta, pos = _parse_tensor(t, pos)
            return self.make(meta), pos
        raise Unencodable("unparsed key")

    def args_kwargs(self) -> tuple[tuple, dict]:
        args: tuple = ()
        kwargs: dict = {}
        pos = 6
        while pos < len(self.t):
            v, pos = self.item(pos)
            if isinstance(v, dict):
                kwargs = v
            else:
                args = tuple(v)  # type: ignore[arg-type]
        return args, kwargs


def rebuild_args(key: ft._DispatchCacheKey, make: Any) -> tuple[tuple, dict]:
    return _Rebuild(key, make).args_kwargs()


def meta_tensor(m: dict) -> torch.Tensor:
    """A meta tensor with exactly the metadata `m` describes: its own storage of
    `storage_bytes`, offset, sizes, strides, requires_grad, inference, conj/neg bits."""
    dtype = _dtype(m["dtype"])
    with torch.inference_mode(bool(m["is_inference"])):
        t = torch.empty((0,), dtype=dtype, device="meta")
        storage = torch.UntypedStorage(m["storage_bytes"] or 0, device="meta")
        t.set_(storage, m["storage_offset"], m["shape"], m["stride"])
    if m["requires_grad"]:
        t.requires_grad_(True)
    if m["is_conj"]:
        torch._C._set_conj(t, True)
    if m["is_neg"]:
        torch._C._set_neg(t, True)
    return t


def validate_entry(key: ft._DispatchCacheKey, entry: object,
                   mode: ft.FakeTensorMode | None = None) -> None:
    """Prove a (decoded) entry right, with FakeTensorMode's own machinery; raises on failure.

    Rebuild fake arguments from the key's metadata, recompute the cache key from them (it must
    equal `key`: the arguments are exactly what the key describes), then for a valid entry
    synthesise the output from the entry and cross-check it against a real dispatch
    (`_crosscheck_cache_output`, the check behind `fake_tensor_cache_crosscheck_enabled`); for a
    bypass entry, dispatch and check that making an entry bypasses for the same reason."""
    from torch._subclasses.fake_tensor import _BypassDispatchCache, _CacheKeyState

    mode = mode or ft.FakeTensorMode()
    func = key.key[0]
    if key.key[5]:
        raise Unencodable("recorded while tracing")

    def make(m: dict) -> ft.FakeTensor:
        return ft.FakeTensor(mode, meta_tensor(m), torch.device(m["device"]))

    args, kwargs = rebuild_args(key, make)
    types = (ft.FakeTensor,)
    # Below autograd, as a dispatch mode runs (the cached op never saw autograd).
    with torch.inference_mode(bool(key.key[3])), torch._C._AutoDispatchBelowADInplaceOrView():
        state = _CacheKeyState(mode.shape_env)
        again = mode._cache_key(state, func, args, kwargs)
        if again != key:
            raise AssertionError(f"rebuilt arguments give another key for {func}")
        if isinstance(entry, ft._DispatchCacheBypassEntry):
            try:
                mode._validate_cache_key(func, args, kwargs)
                out = mode._dispatch_impl(func, types, args, kwargs)
                mode._make_cache_entry(state, key, func, args, kwargs, out)
            except _BypassDispatchCache as e:
                if e.reason != entry.reason:
                    raise AssertionError(f"{func}: bypass {e.reason!r}, entry says {entry.reason!r}")
                return
            raise AssertionError(f"{func}: entry says bypass ({entry.reason}), op caches")
        out = mode._output_from_cache_entry(state, entry, key, func, args)
        with ft.disable_fake_tensor_cache(mode):
            mode._crosscheck_cache_output(out, func, types, args, kwargs)
