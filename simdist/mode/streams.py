"""The one function that turns a recorded step (simdist.trace.StepStreams: the recorders'
named events in execution order) into a rank's trace fields (summarize).

Full execution and the layer memo (mode/layer_memo.py), which extrapolates streams of short
models to the full depth, both go through `summarize`, so the two can only differ if their
streams differ.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from simdist import schema
from simdist.trace import OpEvent, StepStreams


def op_row_key(event: OpEvent) -> tuple[tuple[str, str, str, str], int, int, int]:
    """(op, phase, module, shapes) and the event's weight, flops and bytes."""
    h = event.head
    shapes = ";".join(i.shape for i in event.items if i.role == "a")
    nbytes = sum(i.nbytes for i in event.items if i.role == "o" or not h.write_only)
    return (h.op, h.phase, h.module, shapes), h.weight, h.flops, nbytes


def summarize(streams: StepStreams) -> dict:
    """The RankTrace fields of one step (all but rank, wall_s and fake_cache)."""
    sc = streams.scalars
    # Memory: replay the events; the peak is the first time live bytes reach their maximum.
    live, saved = sc["initial_live"], sc["initial_saved"]
    # saved_at_peak: the activations live at the peak (the peak of activations may come
    # earlier: a peak in the optimizer step holds none); other_bytes is the rest at the peak.
    peak, saved_peak, saved_at_peak, peak_row = live, saved, saved, None
    mem_rows = []
    for phase, module, op, delta, saved_delta in streams.memory:  # MemoryEvent
        if saved_delta:
            saved += saved_delta
            saved_peak = max(saved_peak, saved)
        if delta:
            live += delta
            row = dict(seq=len(mem_rows), phase=phase, module=module, op=op, delta=delta, live=live)
            mem_rows.append(row)
            if live > peak:
                peak, peak_row, saved_at_peak = live, row, saved

    ops: dict[tuple, list[int]] = {}
    op_row: list[int] = []  # the ops table row of every op event
    for event in streams.ops:
        key, weight, flops, nbytes = op_row_key(event)
        row = ops.get(key)
        if row is None:
            row = ops[key] = [0, 0, 0, len(ops)]
        row[0] += weight
        row[1] += weight * flops
        row[2] += weight * nbytes
        op_row.append(row[3])
    colls: dict[tuple, list[int]] = {}
    coll_row: list[int] = []
    for ev in streams.collectives:
        key = ev[:-1]  # every field but the weight
        row = colls.get(key)
        if row is None:
            row = colls[key] = [0, len(colls)]
        row[0] += ev.weight
        coll_row.append(row[1])

    param, grad, optim = sc["param_bytes"], sc["grad_bytes"], sc["optimizer_bytes"]
    op_rows = [dict(op=k[0], phase=k[1], module=k[2], shapes=k[3], count=c, flops=f, bytes=b)
               for k, (c, f, b, _) in ops.items()]
    coll_rows = [dict(op=k[0], kind=k[1], mesh_dim=k[2], group_size=k[3], bytes=k[4],
                      phase=k[5], module=k[6], peer=k[7], count=c) for k, (c, _) in colls.items()]
    total_flops = sum(r["flops"] for r in op_rows)
    return dict(
        peak_bytes=peak, param_bytes=param, grad_bytes=grad, optimizer_bytes=optim,
        activation_bytes=saved_peak,
        other_bytes=max(0, peak - param - grad - optim - saved_at_peak),
        peak_phase=peak_row["phase"] if peak_row else "",
        peak_module=peak_row["module"] if peak_row else "",
        flops=total_flops,
        model_flops=3 * sum(r["flops"] for r in op_rows if r["phase"] == "fwd"),
        hbm_bytes=sum(r["bytes"] for r in op_rows),
        comm_bytes=sum(r["bytes"] * r["count"] for r in coll_rows),
        ops=schema.table(schema.OPS, op_rows),
        collectives=schema.table(schema.COLLECTIVES, coll_rows),
        memory=schema.table(schema.MEMORY, mem_rows),
        kernels=kernels_table(streams, op_row, coll_row),
        executed_microbatches=sc["executed_microbatches"],
    )


def kernels_table(streams: StepStreams, op_row: list[int], coll_row: list[int]) -> pa.Table:
    """The kernel stream with each op and collective joined to its row of the ops and
    collectives tables (the i-th "op" event is the i-th event of the ops stream)."""
    ev = streams.kernels
    n_ops = sum(1 for e in ev if e.kind == "op")
    n_colls = sum(1 for e in ev if e.kind == "coll")
    if n_ops != len(op_row) or n_colls != len(coll_row):
        raise ValueError(f"kernel stream of {n_ops} ops / {n_colls} collectives for "
                         f"{len(op_row)} / {len(coll_row)} recorded")
    ops_it, colls_it = iter(op_row), iter(coll_row)
    rows = [next(ops_it) if e.kind == "op" else next(colls_it) if e.kind == "coll" else -1
            for e in ev]
    # A wait names its event by module and count back within that module: resolve to indices.
    seen: dict[tuple[Any, str], list[int]] = {}
    wait = []
    for i, e in enumerate(ev):
        wait.append(seen[(e.wait_module, e.wait_stream)][-e.wait_back] if e.wait_back > 0 else
                    schema.WAIT_ALL if e.wait_back < 0 else schema.WAIT_NONE)
        seen.setdefault((e.module, e.stream), []).append(i)
    return pa.table({
        "kind": pa.array([e.kind for e in ev], pa.string()),
        "phase": pa.array([e.phase for e in ev], pa.string()),
        "module": pa.array([e.module for e in ev], pa.string()),
        "stream": pa.array([e.stream for e in ev], pa.string()),
        "wait": pa.array(wait, pa.int32()),
        "weight": pa.array([e.weight for e in ev], pa.int64()),
        "label": pa.array([e.label for e in ev], pa.string()),
        "row": pa.array(rows, pa.int32()),
    }, schema=schema.KERNELS)
