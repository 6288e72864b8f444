"""The one function that turns a recorded step (simdist.trace.StepStreams: the recorders'
named events in execution order) into a rank's trace fields (summarize).

Full execution and the layer memo (mode/layer_memo.py), which extrapolates streams of short
models to the full depth, both go through `summarize`, so the two can only differ if their
streams differ.
"""

from __future__ import annotations

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
    peak, saved_peak, peak_row = live, saved, None
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
                peak, peak_row = live, row

    ops: dict[tuple, list[int]] = {}
    for event in streams.ops:
        key, weight, flops, nbytes = op_row_key(event)
        row = ops.setdefault(key, [0, 0, 0])
        row[0] += weight
        row[1] += weight * flops
        row[2] += weight * nbytes
    colls: dict[tuple, int] = {}
    for ev in streams.collectives:
        key = ev[:-1]  # every field but the weight
        colls[key] = colls.get(key, 0) + ev.weight

    param, grad, optim = sc["param_bytes"], sc["grad_bytes"], sc["optimizer_bytes"]
    op_rows = [dict(op=k[0], phase=k[1], module=k[2], shapes=k[3], count=c, flops=f, bytes=b)
               for k, (c, f, b) in ops.items()]
    coll_rows = [dict(op=k[0], kind=k[1], mesh_dim=k[2], group_size=k[3], bytes=k[4],
                      phase=k[5], module=k[6], peer=k[7], count=c) for k, c in colls.items()]
    total_flops = sum(r["flops"] for r in op_rows)
    return dict(
        peak_bytes=peak, param_bytes=param, grad_bytes=grad, optimizer_bytes=optim,
        activation_bytes=saved_peak,
        other_bytes=max(0, peak - param - grad - optim - saved_peak),
        peak_phase=peak_row["phase"] if peak_row else "",
        peak_module=peak_row["module"] if peak_row else "",
        flops=total_flops,
        model_flops=3 * sum(r["flops"] for r in op_rows if r["phase"] == "fwd"),
        hbm_bytes=sum(r["bytes"] for r in op_rows),
        comm_bytes=sum(r["bytes"] * r["count"] for r in coll_rows),
        ops=schema.table(schema.OPS, op_rows),
        collectives=schema.table(schema.COLLECTIVES, coll_rows),
        memory=schema.table(schema.MEMORY, mem_rows),
        executed_microbatches=sc["executed_microbatches"],
    )
