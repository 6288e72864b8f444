"""The sections of one run directory: the summary, memory per rank against the GPU's limit, the
memory timeline of the peak rank, the simulated step's streams, the step time per rank, the
collectives. Every figure is read from the directory's files (plan.json, ranks.parquet,
memory.parquet, collectives.parquet, timeline.json)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from simdist.report.load import RunDir
from simdist.report.page import (GIB, LIMIT_COLOR, MEMORY_COLORS, PHASE_COLORS, TIME_COLORS, Page,
                                 axis, fmt_bytes, fmt_num, fmt_seconds, layout)

CATEGORIES = ("param", "grad", "optimizer", "activation", "other")
TIME_PARTS = (("compute", "compute_s"), ("exposed comm", "exposed_comm_s"), ("bubble", "bubble_s"))
# Above this many ranks, ranks whose plotted values are identical share one bar (a bar per
# rank would be tens of thousands of SVG elements and no more information).
RANK_BARS_MAX = 2048
# The memory timeline keeps each bucket's lowest and highest point beyond this many events.
TIMELINE_POINTS_MAX = 4000
# The step chart merges neighbouring spans of a stream and phase beyond this many spans.
STEP_SPANS_MAX = 6000
STEP_CLASSES_MAX = 4  # classes drawn in the step chart (the binding one first)
CLASS_LEGEND_MAX = 12  # classes named one by one in a legend; more share a colour scale
LIMIT_SCALE = 5.0  # a memory limit above this many times the data's peak is noted, not drawn


@dataclass
class BarGroup:
    """One bar: a rank, or (beyond RANK_BARS_MAX) every rank of a class with the same values."""

    label: str
    ranks: list[int]
    row: dict[str, Any]


def rank_groups(ranks: list[dict[str, Any]], columns: list[str]) -> tuple[list[BarGroup], bool]:
    """(bars, aggregated): a bar per rank, or per distinct (class, values of `columns`)."""
    if len(ranks) <= RANK_BARS_MAX:
        return [BarGroup(str(r["rank"]), [r["rank"]], r) for r in ranks], False
    groups: dict[tuple, BarGroup] = {}
    for r in ranks:
        key = (r["class_id"], *(r[c] for c in columns))
        g = groups.setdefault(key, BarGroup("", [], r))
        g.ranks.append(r["rank"])
    for g in groups.values():
        n = len(g.ranks)
        g.label = (f"class {g.row['class_id']}: rank {g.ranks[0]}" if n == 1 else
                   f"class {g.row['class_id']}: {n:,} ranks from rank {g.ranks[0]}")
    return list(groups.values()), True


def _class_marks(groups: list[BarGroup], x: list[Any], y: list[float], what: str) -> list[dict]:
    """Markers on top of the bars, one legend entry per class (a colour scale beyond
    CLASS_LEGEND_MAX classes): which rank belongs to which class."""
    classes = sorted({g.row["class_id"] for g in groups})
    hover = f"rank %{{x}}<br>class %{{customdata}}<br>{what}: %{{y:.4g}}<extra></extra>"
    if len(classes) > CLASS_LEGEND_MAX:
        return [dict(type="scatter", mode="markers", name=f"{what}, by class", x=x, y=y,
                     customdata=[g.row["class_id"] for g in groups], hovertemplate=hover,
                     marker=dict(color=[g.row["class_id"] for g in groups], size=6,
                                 colorscale="Viridis", symbol="diamond",
                                 colorbar=dict(title=dict(text="class"), len=0.6)))]
    symbols = ["diamond", "circle", "square", "triangle-up", "star", "cross", "x",
               "triangle-down", "pentagon", "hexagon", "star-diamond", "bowtie"]
    out = []
    for k, cid in enumerate(classes):
        idx = [i for i, g in enumerate(groups) if g.row["class_id"] == cid]
        out.append(dict(type="scatter", mode="markers", name=f"{what}, class {cid}",
                        x=[x[i] for i in idx], y=[y[i] for i in idx],
                        customdata=[cid] * len(idx), hovertemplate=hover,
                        marker=dict(symbol=symbols[k % len(symbols)], size=7, color="#111",
                                    line=dict(width=0))))
    return out


def memory_range(top_gib: float, limits_gib: list[float | None]) -> tuple[list[float], list[float]]:
    """(y range, the limits above it). A limit more than LIMIT_SCALE times the data's top
    would flatten the bars to nothing: the axis is scaled to the data and the chart says where
    that limit is."""
    known = [v for v in limits_gib if v]
    shown = [v for v in known if v <= LIMIT_SCALE * top_gib]
    above = sorted({v for v in known if v > LIMIT_SCALE * top_gib})
    return [0, (max([top_gib, *shown]) or 1.0) * 1.1], above


def above_note(above: list[float], top_gib: float, x: float = 1.0,
               xanchor: str = "right") -> dict[str, Any]:
    what = ", ".join(f"{v:.2f}" for v in above)
    return dict(xref="paper", x=x, xanchor=xanchor, yref="paper", y=1.0, yanchor="bottom",
                showarrow=False, font=dict(color=LIMIT_COLOR, size=11),
                text=f"memory limit {what} GiB is above the scale: the peak is "
                     f"{100 * top_gib / max(above):.2g}% of it")


def with_limit(lay: dict[str, Any], top_gib: float, limit_gib: float | None) -> None:
    """The memory limit as a dashed line; when it is off the data's scale (memory_range), a
    note says where it is and a button shows it."""
    if not limit_gib:
        return
    lay.setdefault("shapes", []).append(dict(
        type="line", xref="paper", x0=0, x1=1, yref="y", y0=limit_gib, y1=limit_gib,
        line=dict(color=LIMIT_COLOR, width=2, dash="dash")))
    notes = lay.setdefault("annotations", [])
    notes.append(dict(xref="paper", x=1, xanchor="right", yref="y", y=limit_gib,
                      yanchor="bottom", text=f"memory limit {limit_gib:.2f} GiB",
                      showarrow=False, font=dict(color=LIMIT_COLOR, size=11)))
    near, above = memory_range(top_gib, [limit_gib])
    lay["yaxis"]["range"] = near
    if not above:
        return
    full = [0, limit_gib * 1.08]
    lay["margin"]["t"] = max(lay["margin"]["t"], 70)
    notes.append(above_note(above, top_gib))
    lay["updatemenus"] = [dict(
        type="buttons", direction="left", x=1, xanchor="right", y=1.06, yanchor="bottom",
        showactive=True, font=dict(size=11), buttons=[
            dict(label="scale to the data", method="relayout", args=[{"yaxis.range": near}]),
            dict(label="show the limit", method="relayout", args=[{"yaxis.range": full}])])]


# ---------------------------------------------------------------------------------------------
# Figures


def memory_ranks_figure(run: RunDir) -> tuple[dict[str, Any], str]:
    ranks = run.ranks
    cols = [f"{c}_bytes" for c in CATEGORIES] + ["peak_bytes"]
    groups, aggregated = rank_groups(ranks, cols)
    x: list[Any] = [g.row["rank"] for g in groups] if not aggregated else [g.label for g in groups]
    data = []
    for cat in CATEGORIES:
        data.append(dict(
            type="bar", name=cat, x=x, y=[g.row[f"{cat}_bytes"] / GIB for g in groups],
            marker=dict(color=MEMORY_COLORS[cat], line=dict(width=0)),
            customdata=[[g.row["class_id"], fmt_bytes(g.row[f"{cat}_bytes"])] for g in groups],
            hovertemplate=(f"rank %{{x}}<br>class %{{customdata[0]}}<br>{cat}: "
                           "%{customdata[1]}<extra></extra>")))
    data += _class_marks(groups, x, [g.row["peak_bytes"] / GIB for g in groups], "peak GiB")
    lay = layout(barmode="stack", bargap=0.08 if len(groups) < 64 else 0,
                 xaxis=axis("rank" if not aggregated else "ranks (identical ranks share a bar)",
                            type="linear" if not aggregated else "category", zeroline=False),
                 yaxis=axis("GiB"))
    limit = run.memory_limit_bytes
    top = max(max(g.row["peak_bytes"], sum(g.row[f"{c}_bytes"] for c in CATEGORIES))
              for g in groups)
    with_limit(lay, top / GIB, limit / GIB if limit else None)
    text = ("Each rank's memory at its peak, by category (parameters, gradients and optimizer "
            "state at the optimizer step, the peak of saved activations, the rest at the peak: "
            "temporaries, unsharded parameter copies, buffers; bytes / 2^30). Markers: the "
            "rank's peak, one symbol per rank class. Dashed: the memory limit (HBM less 1 GiB "
            "reserved).")
    if aggregated:
        text += (f" {len(ranks):,} ranks: ranks of one class with identical rows share a bar "
                 f"({len(groups):,} bars); ranks.parquet has every rank.")
    return dict(data=data, layout=lay), text


def binding_memory_rank(run: RunDir) -> dict[str, Any]:
    peak = run.plan.get("peak_rank")
    by_rank = {r["rank"]: r for r in run.ranks}
    if peak in by_rank:
        return by_rank[peak]
    return max(run.ranks, key=lambda r: (r["peak_bytes"], -r["rank"]))


def decimate(values: list[int], keep: int) -> list[int]:
    """Indices of a series to draw: all of them up to `keep`, else each bucket's lowest and
    highest point (in order), so every peak and trough stays."""
    n = len(values)
    if n <= keep:
        return list(range(n))
    size = math.ceil(n / (keep // 2))
    out: list[int] = []
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        chunk = range(lo, hi)
        a = min(chunk, key=values.__getitem__)
        b = max(chunk, key=values.__getitem__)
        out.extend(sorted({a, b}))
    if out[-1] != n - 1:
        out.append(n - 1)
    return out


def memory_timeline_figure(run: RunDir) -> tuple[dict[str, Any], str] | None:
    row = binding_memory_rank(run)
    cid = row["class_id"]
    mem = run.memory
    if mem.num_rows == 0:
        return None
    part = mem.filter(pc.equal(mem["class_id"], cid)).sort_by("seq")
    if part.num_rows == 0:
        return None
    seq = part["seq"].to_pylist()
    live = part["live"].to_pylist()
    phase = part["phase"].to_pylist()
    module = part["module"].to_pylist()
    op = part["op"].to_pylist()
    idx = decimate(live, TIMELINE_POINTS_MAX)
    top = max(range(len(live)), key=lambda i: (live[i], -i))
    data = []
    # One filled area per phase (no line: where the phase changes, its area drops to zero at
    # the next phase's first event), then one line of the live bytes over every phase.
    runs: dict[str, list[tuple[int, int]]] = defaultdict(list)  # phase -> [(first, next)]
    start = 0
    for j in range(1, len(idx) + 1):
        if j == len(idx) or phase[idx[j]] != phase[idx[start]]:
            runs[phase[idx[start]]].append((start, j))
            start = j
    for ph, spans in runs.items():
        xs: list[Any] = []
        ys: list[Any] = []
        for first, nxt in spans:
            xs.append(seq[idx[first]])
            ys.append(0.0)
            xs.extend(seq[i] for i in idx[first:nxt])
            ys.extend(live[i] / GIB for i in idx[first:nxt])
            end = seq[idx[nxt]] if nxt < len(idx) else seq[idx[nxt - 1]]
            xs += [end, end]
            ys += [live[idx[nxt - 1]] / GIB, 0.0]
        color = PHASE_COLORS.get(ph, "#777777")
        data.append(dict(type="scatter", mode="lines", name=ph, x=xs, y=ys, fill="tozeroy",
                         fillcolor=color + "88", line=dict(shape="hv", width=0, color=color),
                         hoverinfo="skip"))
    data.append(dict(type="scatter", mode="lines", name="live bytes",
                     x=[seq[i] for i in idx], y=[live[i] / GIB for i in idx],
                     text=[f"{module[i] or '(root)'} · {op[i]} ({phase[i]})" for i in idx],
                     line=dict(shape="hv", width=1, color="#222"),
                     hovertemplate="event %{x}<br>%{y:.4f} GiB<br>%{text}<extra></extra>"))
    lay = layout(xaxis=axis("event (allocation order; not time)"), yaxis=axis("live GiB"),
                 hovermode="x")
    lay["annotations"] = [dict(x=seq[top], y=live[top] / GIB, text=f"peak {live[top] / GIB:.3f} "
                               f"GiB: {module[top] or '(root)'} ({phase[top]})", showarrow=True,
                               arrowhead=2, ax=-40, ay=-30, font=dict(size=11))]
    limit = run.memory_limit_bytes
    with_limit(lay, live[top] / GIB, limit / GIB if limit else None)
    text = (f"Live bytes after every allocation and free of class {cid} (the class of rank "
            f"{row['rank']}, the rank with the highest peak), resident parameters and "
            "optimizer state included, coloured by phase (init, fwd, bwd, optim; micro-batches "
            "and pipeline actions interleave fwd and bwd). From memory.parquet.")
    if len(idx) < len(live):
        text += (f" {len(live):,} events drawn as {len(idx):,} points (each bucket's lowest "
                 "and highest), so every peak is kept.")
    return dict(data=data, layout=lay), text


@dataclass
class Span:
    row: str
    start: float  # µs
    end: float
    phase: str
    name: str


def step_streams(timeline: dict[str, Any], classes: list[int]) -> tuple[list[str], list[Span],
                                                                          dict[int, str]]:
    """(rows top to bottom, spans, class -> process name) of the chosen classes, from the
    Chrome trace events of timeline.json."""
    procs: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    spans_by: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for ev in timeline.get("traceEvents", []):
        pid, tid = ev.get("pid"), ev.get("tid", 0)
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            procs[pid] = ev.get("args", {}).get("name", f"class {pid}")
        elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
            threads[(pid, tid)] = ev.get("args", {}).get("name", str(tid))
        elif ev.get("ph") == "X" and pid in classes:
            spans_by[(pid, tid)].append(ev)
    rows: list[str] = []
    spans: list[Span] = []
    for pid in classes:
        tids = sorted({t for p, t in spans_by if p == pid},
                      key=lambda t: (threads.get((pid, t)) != "compute", t))
        for tid in tids:
            label = f"class {pid} · {threads.get((pid, tid), tid)}"
            rows.append(label)
            for ev in spans_by[(pid, tid)]:
                spans.append(Span(label, float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]),
                                  ev.get("cat") or "", ev.get("name") or ""))
    return rows, spans, procs


def coarsen(spans: list[Span], limit: int) -> tuple[list[Span], float]:
    """Merge neighbouring spans of one row and phase closer than a gap that doubles until at
    most `limit` remain; (spans, the gap in µs, 0 when nothing was merged)."""
    if len(spans) <= limit or not spans:
        return spans, 0.0
    total = max(s.end for s in spans) - min(s.start for s in spans)
    gap = max(total / 20_000, 1e-3)
    by_row: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_row[s.row].append(s)
    while True:
        out: list[Span] = []
        for row_spans in by_row.values():
            cur: Span | None = None
            n = 0
            for s in sorted(row_spans, key=lambda s: s.start):
                if cur is not None and s.phase == cur.phase and s.start - cur.end <= gap:
                    cur.end = max(cur.end, s.end)
                    n += 1
                    continue
                if cur is not None:
                    out.append(_named(cur, n))
                cur, n = Span(s.row, s.start, s.end, s.phase, s.name), 1
            if cur is not None:
                out.append(_named(cur, n))
        if len(out) <= limit or gap > total:
            return out, gap
        gap *= 2


def _named(s: Span, n: int) -> Span:
    if n > 1:
        s.name = f"{n} spans from {s.name}"
    return s


def step_timeline_figure(run: RunDir) -> tuple[dict[str, Any], str] | None:
    ranks = run.ranks
    by_rank = {r["rank"]: r for r in ranks}
    slow = (run.plan.get("time_breakdown") or {}).get("rank")
    slow_row = by_rank.get(slow) or max(ranks, key=lambda r: (r["step_s"], -r["rank"]))
    all_classes = sorted({r["class_id"] for r in ranks})
    chosen = [slow_row["class_id"]] + [c for c in all_classes if c != slow_row["class_id"]]
    chosen = chosen[:STEP_CLASSES_MAX]
    rows, spans, procs = step_streams(run.timeline, chosen)
    if not spans:
        return None
    spans, gap = coarsen(spans, STEP_SPANS_MAX)
    data = []
    for ph in list(dict.fromkeys(s.phase for s in spans)):
        mine = [s for s in spans if s.phase == ph]
        data.append(dict(
            type="bar", orientation="h", name=ph or "(none)", y=[s.row for s in mine],
            base=[s.start / 1e3 for s in mine], x=[(s.end - s.start) / 1e3 for s in mine],
            text=[s.name for s in mine], textposition="none",
            marker=dict(color=PHASE_COLORS.get(ph, "#888"), line=dict(width=0)),
            hovertemplate="%{y}<br>%{text}<br>%{base:.4f} ms + %{x:.4f} ms"
                          f" ({ph})<extra></extra>"))
    height = max(260, 60 + 28 * len(rows))
    lay = layout(barmode="overlay", bargap=0.25, height=height,
                 xaxis=axis("ms from the start of the step"),
                 yaxis=dict(type="category", categoryorder="array",
                            categoryarray=list(reversed(rows)), automargin=True))
    names = ", ".join(procs.get(c, f"class {c}") for c in chosen)
    text = (f"The simulated step ({names}): a row per stream — the compute stream, FSDP's "
            "all-gather and reduce streams, one stream per process group for its collectives — "
            "each span a module's kernels in one phase, placed by the event simulation of the "
            "recorded kernel stream. The slowest rank's class is first. From timeline.json "
            "(open it in Perfetto or chrome://tracing for every span).")
    if len(all_classes) > len(chosen):
        text += f" {len(all_classes) - len(chosen)} more classes are in timeline.json."
    if gap:
        text += (f" Spans of one stream and phase less than {gap:.3g} µs apart are drawn as "
                 "one.")
    return dict(data=data, layout=lay), text


def time_ranks_figure(run: RunDir) -> tuple[dict[str, Any], str]:
    ranks = run.ranks
    cols = ["compute_s", "exposed_comm_s", "bubble_s", "step_s"]
    groups, aggregated = rank_groups(ranks, cols)
    x: list[Any] = [g.row["rank"] for g in groups] if not aggregated else [g.label for g in groups]
    data = []
    for name, col in TIME_PARTS:
        data.append(dict(type="bar", name=name, x=x, y=[g.row[col] * 1e3 for g in groups],
                         marker=dict(color=TIME_COLORS[name], line=dict(width=0)),
                         customdata=[g.row["class_id"] for g in groups],
                         hovertemplate=f"rank %{{x}}<br>class %{{customdata}}<br>{name}: "
                                       "%{y:.4f} ms<extra></extra>"))
    rest = [max(0.0, g.row["step_s"] - sum(g.row[c] for _, c in TIME_PARTS)) * 1e3
            for g in groups]
    if any(v > 0 for v in rest):
        data.append(dict(type="bar", name="other idle", x=x, y=rest,
                         marker=dict(color=TIME_COLORS["other idle"], line=dict(width=0)),
                         hovertemplate="rank %{x}<br>other idle: %{y:.4f} ms<extra></extra>"))
    data += _class_marks(groups, x, [g.row["step_s"] * 1e3 for g in groups], "step ms")
    lay = layout(barmode="stack", bargap=0.08 if len(groups) < 64 else 0,
                 xaxis=axis("rank" if not aggregated else "ranks (identical ranks share a bar)",
                            type="linear" if not aggregated else "category", zeroline=False),
                 yaxis=axis("ms"))
    text = ("Each rank's step: compute (kernel time on the compute stream, contention with "
            "concurrent collectives included), exposed communication (the compute stream "
            "waiting on a collective or a transfer), pipeline bubble (waiting for other "
            "stages), and any other idle time; markers: the rank's step time (the plan's is the "
            "slowest rank's). The parts come from the rank's own replay and the pipeline "
            "replay, so a rank's bar can end a little past or before its step marker. "
            "From ranks.parquet.")
    if aggregated:
        text += (f" {len(ranks):,} ranks: ranks of one class with identical times share a bar "
                 f"({len(groups):,} bars).")
    return dict(data=data, layout=lay), text


@dataclass
class CollectiveGroup:
    class_id: int
    kind: str
    mesh_dim: str
    group_size: int
    phase: str
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    sizes: set | None = None


def collective_groups(rows: list[dict[str, Any]]) -> list[CollectiveGroup]:
    """collectives.parquet by class, kind, mesh dim, group size and phase; the slowest first
    within each class."""
    out: dict[tuple, CollectiveGroup] = {}
    for r in rows:
        key = (r["class_id"], r["kind"], r["mesh_dim"], r["group_size"], r["phase"])
        g = out.setdefault(key, CollectiveGroup(*key, sizes=set()))
        g.calls += r["count"]
        g.bytes += r["bytes"] * r["count"]
        g.seconds += r.get("est_time_s") or 0.0
        g.sizes.add(r["bytes"])
    return sorted(out.values(), key=lambda g: (g.class_id, -g.seconds, g.kind, g.mesh_dim))


def collectives_figure(groups: list[CollectiveGroup]) -> dict[str, Any]:
    classes = sorted({g.class_id for g in groups})
    x = [f"class {c}" for c in classes]
    data = []
    for kind, dim in sorted({(g.kind, g.mesh_dim) for g in groups}):
        y, calls, byts = [], [], []
        for c in classes:
            mine = [g for g in groups if g.class_id == c and (g.kind, g.mesh_dim) == (kind, dim)]
            y.append(sum(g.seconds for g in mine) * 1e3)
            calls.append(sum(g.calls for g in mine))
            byts.append(fmt_bytes(sum(g.bytes for g in mine)))
        data.append(dict(type="bar", name=f"{kind} / {dim}", x=x, y=y,
                         customdata=[[a, b] for a, b in zip(calls, byts)],
                         hovertemplate=f"%{{x}}<br>{kind} over {dim}: %{{y:.4f}} ms<br>"
                                       "%{customdata[0]} calls, %{customdata[1]}<extra></extra>"))
    return dict(data=data, layout=layout(barmode="stack", height=360, xaxis=axis("rank class"),
                                         yaxis=axis("ms (sum over calls)")))


# ---------------------------------------------------------------------------------------------
# Sections


def summary_cards(plan: dict[str, Any], ranks: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    fits = plan.get("fits")
    limit = plan.get("memory_limit_bytes")
    peak = plan.get("peak_bytes_max", max(r["peak_bytes"] for r in ranks))
    cards = [
        ("fits", "yes" if fits else "no", "good" if fits else "bad"),
        (f"peak (rank {plan.get('peak_rank', '?')})" + (f" of {limit / GIB:.2f} GiB" if limit
                                                        else ""), f"{peak / GIB:.3f} GiB", ""),
        ("step time", fmt_seconds(plan.get("step_time_s")), ""),
        ("MFU", "" if plan.get("mfu") is None else f"{100 * plan['mfu']:.1f}%", ""),
        ("tokens/s", fmt_num(plan.get("tokens_per_s"), ",.0f"), ""),
        ("tokens/s per GPU", fmt_num(plan.get("tokens_per_s_per_gpu"), ",.0f"), ""),
    ]
    if plan.get("cost_per_million_tokens") is not None:
        cards.append(("cost per million tokens (price × GPUs × time)",
                      f"{plan['cost_per_million_tokens']:.4g}", ""))
    cards += [("GPUs", fmt_num(plan.get("world_size", len(ranks)), ","), ""),
              ("rank classes", fmt_num(plan.get("rank_classes"), ","), "")]
    if plan.get("gpu"):
        cards.append(("GPU", str(plan["gpu"]), ""))
    if plan.get("bottleneck"):
        cards.append(("bottleneck", plan["bottleneck"], "wide"))
    return cards


def describe(plan: dict[str, Any]) -> str:
    """'llama3-debug · dp_shard 2 · tp 2 · pp 2 · seq 512 · micro-batch 1 · global batch 8'."""
    cfg = plan.get("config") or {}
    model = cfg.get("model") or {}
    name = model.get("preset") or ("hf" if model.get("hf") else model.get("entrypoint")) or ""
    par = cfg.get("parallel") or {}
    tr = cfg.get("training") or {}
    parts = [str(name)] if name else []
    for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep"):
        v = par.get(k)
        if v not in (None, 1):
            parts.append(f"{k} {v}")
    for k, label in (("seq_len", "seq"), ("micro_batch", "micro-batch"),
                     ("global_batch", "global batch"),
                     ("activation_checkpointing", "AC")):
        if tr.get(k) is not None:
            parts.append(f"{label} {tr[k]}")
    return " · ".join(parts)


def add_run_sections(page: Page, run: RunDir, prefix: str = "", title: str = "") -> None:
    """Every section of a run; `prefix` keeps chart ids and anchors unique on a page that holds
    more than one run (a sweep's best plan)."""
    plan = run.plan
    ranks = run.ranks
    head = f"{title}: " if title else ""
    nav = None if title else ""  # a nested run: one link, to its summary
    page.section(f"{prefix}summary", f"{head}summary", describe(plan), nav=title or "")
    page.cards(summary_cards(plan, ranks))
    bd = plan.get("time_breakdown")
    if bd:
        page.note(f"Slowest rank {bd['rank']}: compute {fmt_seconds(bd['compute_s'])}, comm "
                  f"{fmt_seconds(bd['comm_s'])} of which exposed "
                  f"{fmt_seconds(bd['exposed_comm_s'])}, bubble {fmt_seconds(bd['bubble_s'])}, "
                  f"step {fmt_seconds(bd['step_s'])}.")

    page.section(f"{prefix}memory", f"{head}memory per rank", nav=nav)
    fig, text = memory_ranks_figure(run)
    page.chart(f"{prefix}memory-ranks", fig, text)

    tl = memory_timeline_figure(run)
    page.section(f"{prefix}memory-timeline", f"{head}memory timeline of the peak rank", nav=nav)
    if tl is None:
        page.note("memory.parquet has no events for the peak rank's class.")
    else:
        page.chart(f"{prefix}memory-timeline", *tl)

    st = step_timeline_figure(run)
    page.section(f"{prefix}step", f"{head}the step's streams", nav=nav)
    if st is None:
        page.note("timeline.json has no spans.")
    else:
        page.chart(f"{prefix}step-timeline", *st)

    page.section(f"{prefix}time", f"{head}step time per rank", nav=nav)
    page.chart(f"{prefix}time-ranks", *time_ranks_figure(run))

    page.section(f"{prefix}collectives", f"{head}collectives",
                 "Per rank class (its representative's calls, timed for the class's slowest "
                 "rank's placement), by kind, mesh dimension, group size and phase. From "
                 "collectives.parquet.", nav=nav)
    groups = collective_groups(run.collectives)
    if not groups:
        page.note("No collectives (a single GPU, or nothing to communicate).")
    else:
        page.chart(f"{prefix}collectives-time", collectives_figure(groups))
        rows = [[f"class {g.class_id}", g.kind, g.mesh_dim, str(g.group_size), g.phase,
                 f"{g.calls:,}",
                 fmt_bytes(next(iter(g.sizes))) if len(g.sizes) == 1 else "several",
                 fmt_bytes(g.bytes), f"{g.seconds * 1e3:.4f}"] for g in groups]
        page.table(["class", "kind", "mesh dim", "group", "phase", "calls", "bytes per call",
                    "bytes (all calls)", "est. ms"], rows, text_cols=5, limit=300)
    if plan.get("config"):
        page.preformatted("the resolved config (plan.json)",
                          json.dumps(plan["config"], indent=2, default=str))


def run_page(run: RunDir) -> Page:
    plan = run.plan
    sub = (f"{plan.get('world_size', len(run.ranks)):,} GPUs · simdist "
           f"{plan.get('simdist_version', '?')}"
           + (f", torch {plan['torch_version']}" if plan.get("torch_version") else ""))
    page = Page(title=f"simdist run: {describe(plan) or run.path.name}", subtitle=sub)
    add_run_sections(page, run)
    return page
