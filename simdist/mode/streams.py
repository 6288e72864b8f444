"""What one recorded step did, in execution order, before aggregation (StepStreams), and the one
function that turns it into a rank's trace fields (summarize).

The recorders append to these streams; full execution and the layer memo (mode/layer_memo.py),
which extrapolates streams of short models to the full depth, both go through `summarize`, so
the two can only differ if their streams differ.

Event tuples (plain tuples: cheap to append, hashable, comparable):
- memory: (phase, module, op, delta, saved_delta). delta != 0 is an allocation (+) or free (-)
  of live bytes; saved_delta != 0 (with delta == 0) is a change of the bytes autograd keeps for
  backward (the activation curve).
- ops: ((op, phase, module, weight, flops, write_only), items) with items a tuple of
  ("a", "shape:dtype", nbytes) per tensor argument then ("o", "", nbytes) per tensor output.
  Foreach ops (the optimizer's) carry one item per tensor of their lists.
- collectives: (op, kind, mesh_dim, group_size, bytes, phase, module, peer, weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simdist import schema

# Scalars of the step that are not events: live and saved bytes when recording starts (resident
# parameters, optimizer state, buffers) and the storage sizes read at the optimizer step.
SCALARS = ("initial_live", "initial_saved", "param_bytes", "grad_bytes", "optimizer_bytes",
           "executed_microbatches")


@dataclass
class StepStreams:
    memory: list[tuple] = field(default_factory=list)
    ops: list[tuple] = field(default_factory=list)
    collectives: list[tuple] = field(default_factory=list)
    scalars: dict[str, int] = field(default_factory=dict)


def op_row_key(event: tuple) -> tuple[tuple[str, str, str, str], int, int, int]:
    """(op, phase, module, shapes) and the event's weight, flops and bytes."""
    (op, phase, module, weight, flops, write_only), items = event
    shapes = ";".join(shape for role, shape, _ in items if role == "a")
    nbytes = sum(n for role, _, n in items if role == "o" or not write_only)
    return (op, phase, module, shapes), weight, flops, nbytes


def summarize(streams: StepStreams) -> dict:
    """The RankTrace fields of one step (all but rank, wall_s and fake_cache)."""
    sc = streams.scalars
    # Memory: replay the events; the peak is the first time live bytes reach their maximum.
    live, saved = sc["initial_live"], sc["initial_saved"]
    peak, saved_peak, peak_row = live, saved, None
    mem_rows = []
    for phase, module, op, delta, saved_delta in streams.memory:
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
    for *key, weight in streams.collectives:
        colls[tuple(key)] = colls.get(tuple(key), 0) + weight

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
