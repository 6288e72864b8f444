"""Event simulation of one rank's step: its recorded kernel stream (simdist/mode/kernels.py)
replayed on its streams with the dependencies the real code has, on kernel and collective
times from the cost model. A library over columns: it knows nothing of how the stream was
recorded.

Rules (what the GPU does with the stream the CPU issues in program order):
- Each stream runs its events in order, one at a time.
- A compute op starts when the compute stream is free and, if it waits for an event of another
  stream (`wait`), when that event is done; WAIT_ALL: when every other stream is done.
- An event of another stream (an FSDP2 copy-in, a collective) starts when its stream is free,
  when the compute stream has finished what was issued before it (its input is ready: FSDP2
  and DDP make their streams wait for the compute stream), and after the event issued just
  before it on another non-compute stream (FSDP2's copy-in, then its all-gather).
- Joins the real code makes by phase: a backward's end (FSDP2's final callback waits for the
  reduce-scatters; DDP's for the all-reduces) and the optimizer step wait for every stream.
- Compute that runs while a collective runs is slower by the calibrated factor of the
  collective's link level (SMs taken by NCCL, HBM contention), for the overlapped part.
- A run of events standing for w identical micro-batches (weight w) is simulated once and its
  span repeated w times.
- The step ends when every stream is done.

Pipeline stages: the stream's marks delimit the schedule's actions; `pipeline_makespan`
replays every stage's actions in the schedule's own order with cross-stage dependencies
(F of a micro-batch needs the previous stage's F and the activation transfer; B the next
stage's B and the gradient transfer), so bubbles, a slow last stage or a straggler emerge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Action", "Span", "StepResult", "WAIT_ALL", "WAIT_NONE", "pipeline_makespan",
           "simulate_step"]

WAIT_NONE, WAIT_ALL = -1, -2  # as simdist.schema.KERNELS
COMPUTE = "compute"


# A span of the simulated step (keep_spans): (stream, start, end, index of the event in the
# kernel stream). A plain tuple: a step keeps one per timed event (10^5 for a deep pipeline
# stage), and a named record costs several times a tuple to build.
Span = tuple[str, float, float, int]


@dataclass(frozen=True)
class Action:
    """A pipeline action of this rank (kind F | B | I | W, stage, micro-batch) and its span."""
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class StepResult:
    step_s: float  # every stream done
    compute_s: float  # compute-stream kernel time, contention included
    comm_s: float  # collective time (all streams, counted once per call)
    exposed_comm_s: float  # compute stream idle waiting on other streams
    comm_by_stream: dict[str, float] = field(default_factory=dict)
    exposed_by_stream: dict[str, float] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    spans: list[Span] | None = None  # with keep_spans


def simulate_step(kind: Sequence[str], phase: Sequence[str], stream: Sequence[str],
                  wait: Sequence[int], weight: Sequence[int], label: Sequence[str],
                  duration: np.ndarray, slowdown: np.ndarray,
                  keep_spans: bool = False) -> StepResult:
    """One rank's step. `duration[i]`: seconds of event i alone (0 for marks); `slowdown[i]`:
    for a collective, the factor by which compute beside it runs slower (1 otherwise)."""
    n = len(kind)
    # Plain Python lists: the loop reads one element at a time, and a numpy scalar read costs
    # several times a list read (the values are the same doubles).
    duration = duration.tolist() if isinstance(duration, np.ndarray) else list(duration)
    slowdown = slowdown.tolist() if isinstance(slowdown, np.ndarray) else list(slowdown)
    done = [0.0] * n
    free: dict[str, float] = {}  # stream -> when it is free
    busy: dict[str, tuple[float, float]] = {}  # non-compute stream -> (until, slowdown)
    busy_until = 0.0  # the latest `until` in busy: compute starting after it runs unslowed
    t = 0.0  # the compute stream's clock
    compute_s = comm_s = exposed = 0.0
    comm_by: dict[str, float] = {}
    exposed_by: dict[str, float] = {}
    spans: list[Span] | None = [] if keep_spans else None
    actions: list[Action] = []
    open_actions: dict[tuple, float] = {}
    prev_phase = ""
    prev_side = -1  # index of the previous event when it ran on a non-compute stream
    i = 0
    while i < n:
        w = int(weight[i])
        if w > 1:  # a run of identical micro-batches: simulate once, repeat its span
            j = i
            while j < n and int(weight[j]) == w:
                j += 1
            t0 = _join(free, t)
            # (waits on events before the run are met: it starts with every stream joined)
            part = simulate_step(kind[i:j], phase[i:j], stream[i:j],
                                 [x - i if x >= i else WAIT_NONE if x >= 0 else x
                                  for x in wait[i:j]], [1] * (j - i),
                                 label[i:j], duration[i:j], slowdown[i:j], keep_spans)
            if spans is not None:  # the first repetition as it runs, the others as one span
                spans.extend((st, t0 + a, t0 + b, x + i) for st, a, b, x in part.spans or [])
                spans.append((COMPUTE, t0 + part.step_s, t0 + w * part.step_s, i))
            t = t0 + w * part.step_s
            for s in list(free):
                free[s] = t
            busy.clear()
            busy_until = 0.0
            compute_s += w * part.compute_s
            comm_s += w * part.comm_s
            exposed += w * part.exposed_comm_s
            for s, v in part.comm_by_stream.items():
                comm_by[s] = comm_by.get(s, 0.0) + w * v
            for s, v in part.exposed_by_stream.items():
                exposed_by[s] = exposed_by.get(s, 0.0) + w * v
            done[i:j] = [t] * (j - i)
            prev_side, prev_phase = -1, phase[j - 1]
            i = j
            continue
        k, s, ph = kind[i], stream[i], phase[i]
        if k == "mark":
            _, act, stage, mb = label[i].split()
            key = (act, int(stage), int(mb))
            if label[i].startswith("begin"):
                open_actions[key] = t
            else:
                actions.append(Action(act, int(stage), int(mb), open_actions.pop(key, t), t))
            done[i] = t
            i += 1
            continue
        d = duration[i]
        if s == COMPUTE:
            start = t
            joins = (prev_phase == "bwd" and ph != "bwd") or (ph == "optim" and prev_phase != "optim")
            if joins or wait[i] == WAIT_ALL:
                waited = _latest(free)
            elif wait[i] >= 0:
                waited = (done[wait[i]], stream[wait[i]])
            else:
                waited = (0.0, "")
            if waited[0] > start:
                exposed += waited[0] - start
                exposed_by[waited[1]] = exposed_by.get(waited[1], 0.0) + waited[0] - start
                start = waited[0]
            if busy_until > start:  # else no collective runs beside it: `d` as it is
                d = _contended(d, start, busy)
            t = start + d
            done[i] = t
            compute_s += d
            prev_side = -1
        else:
            start = max(free.get(s, 0.0), t, done[prev_side] if prev_side >= 0 else 0.0)
            end = start + d
            free[s] = end
            done[i] = end
            if k == "coll":
                comm_s += d
                comm_by[s] = comm_by.get(s, 0.0) + d
                busy[s] = (end, slowdown[i])
                busy_until = max(busy_until, end)
            prev_side = i
        if spans is not None and d > 0:
            spans.append((s, done[i] - d, done[i], i))
        prev_phase = ph
        i += 1
    step = max([t, *free.values()])
    return StepResult(step, compute_s, comm_s, exposed, comm_by, exposed_by, actions, spans)


def _join(free: dict[str, float], t: float) -> float:
    return max([t, *free.values()])


def _latest(free: dict[str, float]) -> tuple[float, str]:
    if not free:
        return 0.0, ""
    s = max(free, key=free.get)
    return free[s], s


def _contended(d: float, start: float, busy: dict[str, tuple[float, float]]) -> float:
    """`d` seconds of compute from `start`, slower while a collective runs beside it."""
    factor, until = 1.0, start
    for end, f in busy.values():
        if end > start and f > factor:
            factor, until = f, end
    if factor == 1.0:
        return d
    overlap = min(d * factor, until - start)  # the slowed part, in wall time
    return overlap + (d - overlap / factor)


def pipeline_makespan(actions: dict[int, list[Action]], pre_s: dict[int, float],
                      post_s: dict[int, float], num_stages: int) -> dict[int, tuple[float, float]]:
    """(step seconds, bubble seconds) of every pp rank. `actions[r]`: rank r's actions in its
    order, with their durations (end - start of the rank's own simulation; an action includes
    the wait for its receive, which the schedule issues before it and its first op reads, so
    the transfer between stages is in it); `pre_s` / `post_s`: the rank's time before its first
    and after its last action (FSDP2's first all-gathers; the deferred reductions and the
    optimizer)."""
    finish: dict[tuple, float] = {}
    cursor = {r: 0 for r in actions}
    clock = {r: pre_s.get(r, 0.0) for r in actions}
    busy = {r: 0.0 for r in actions}
    remaining = sum(len(a) for a in actions.values())
    while remaining:
        progressed = False
        for r, acts in actions.items():
            while cursor[r] < len(acts):
                a = acts[cursor[r]]
                dep = _dependency(a, num_stages)
                if dep is not None and dep not in finish:
                    break
                ready = clock[r] if dep is None else max(clock[r], finish[dep])
                dur = a.end - a.start
                clock[r] = ready + dur
                busy[r] += dur
                finish[(a.kind, a.stage, a.microbatch)] = clock[r]
                if a.kind in ("B", "I"):  # the stage's input gradient is ready
                    finish[("G", a.stage, a.microbatch)] = clock[r]
                cursor[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("pipeline schedule deadlocks: an action waits on one never run")
    out = {}
    for r in actions:
        step = clock[r] + post_s.get(r, 0.0)
        out[r] = (step, clock[r] - pre_s.get(r, 0.0) - busy[r])
    return out


def _dependency(a: Action, num_stages: int) -> tuple[str, int, int] | None:
    """The action of another stage `a` waits for (its input activation or gradient)."""
    if a.kind == "F":
        return ("F", a.stage - 1, a.microbatch) if a.stage > 0 else None
    if a.kind in ("B", "I"):
        if a.stage == num_stages - 1:
            return None
        return _backward_of(a.stage + 1, a.microbatch)
    return None  # W: the rank's own I before it (its order)


def _backward_of(stage: int, mb: int) -> tuple[str, int, int]:
    # A stage's input gradient comes from its full backward (B) or input-grad-only pass (I);
    # `finish` holds whichever the schedule ran, both under their own kind.
    return ("G", stage, mb)
