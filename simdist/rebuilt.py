"""Rebuilt ranks kept by the layer store: a class rebuilt from its memo model (memo.py) is a
pure function of the model and the class's depth, so its trace's tables and fields are kept
beside the model (cache/layers.py: put_tables) and a warm run reads them instead of rebuilding
the events (JSON parts, extrapolation, summarize: seconds per class for a deep pipeline
stage). Read and written by the coordinator only, on the driver's node.

Exact by construction: the entry's key is the model's key (execution_key.py) and the memo
shape; the group sizes the key leaves out are relabelled for the reading rank
(execution_key.relabel_table), and a rank whose recorded sizes are not its layout's degrees is
never kept."""

from __future__ import annotations

import time

import torch

from simdist.cache.layers import LayerStore
from simdist.execution_key import relabel_table, table_relabellable
from simdist.memo import MemoJob, account_stored, memo_key
from simdist.trace import RankTask, RankTrace

# A rank's step as `summarize` gives it (mode/streams.py): its tables and its fields.
TABLES = ("ops", "collectives", "memory", "kernels")
FIELDS = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes", "peak_phase", "peak_module", "flops", "model_flops", "hbm_bytes",
          "comm_bytes", "executed_microbatches")


def _entry(task: RankTask) -> tuple[LayerStore, str, MemoJob] | None:
    """The store, the rebuilt rank's key and a memo job (for its accounting) of `task`; None
    where the memo does not apply or there is no store."""
    found = memo_key(task)
    if found is None or not found[1]:
        return None
    shape, key = found
    store = LayerStore.open(task.layer_cache_dir, torch.__version__)
    return store, store.rebuilt_key(key, repr(shape)), MemoJob(task, shape, key, None)


def stored_rank(task: RankTask) -> RankTrace | None:
    """`task`'s trace read from the layer store (a memo hit, nothing executed or rebuilt), or
    None where none is kept."""
    t0 = time.perf_counter()
    entry = _entry(task)
    got = entry[0].get_tables(entry[1]) if entry is not None else None
    if got is None:
        return None
    tables, fields = got
    if set(tables) != set(TABLES) or set(fields) != set(FIELDS):
        return None  # (a foreign entry: the key matched but the contents do not)
    tables["collectives"] = relabel_table(tables["collectives"], task)
    trace = RankTrace(rank=task.rank, wall_s=0.0, **fields, **tables)
    return account_stored(entry[2], trace, time.perf_counter() - t0)


def keep_rebuilt(task: RankTask, trace: RankTrace) -> None:
    """Keep `trace` (a class rebuilt through the memo) for later runs."""
    if trace.layer_memo not in ("memo", "memo-hit", "shared"):
        return
    entry = _entry(task)
    if entry is None or not table_relabellable(trace.collectives, task):
        return
    entry[0].put_tables(entry[1], {t: getattr(trace, t) for t in TABLES},
                        {f: getattr(trace, f) for f in FIELDS})
