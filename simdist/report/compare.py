"""The page of `simdist compare --html`: plans side by side as charts — headline figures, each
rank class's memory breakdown against its GPU's limit, each class's step-time breakdown, the
collectives of each plan's slowest class — then compare's own tables. From the run
directories alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simdist.report.load import RunDir
from simdist.report.page import (GIB, LIMIT_COLOR, MEMORY_COLORS, TIME_COLORS, Page, axis,
                                 layout)
from simdist.report.run import CATEGORIES, TIME_PARTS, above_note, memory_range

COMPARE_GENERATOR = "simdist compare"  # the marker compare checks before replacing a file


def per_class(ranks: list[dict]) -> dict[int, dict[str, Any]]:
    """class_id -> ranks, the memory breakdown of its highest-peak rank and the time breakdown
    of its slowest rank."""
    out: dict[int, dict[str, Any]] = {}
    for r in ranks:
        c = out.setdefault(r["class_id"], dict(ranks=0, mem=r, time=r))
        c["ranks"] += 1
        if r["peak_bytes"] > c["mem"]["peak_bytes"]:
            c["mem"] = r
        if r["step_s"] > c["time"]["step_s"]:
            c["time"] = r
    return out


def binding_class(ranks: list[dict]) -> int:
    """The class of the slowest rank (the lowest rank among equals)."""
    return max(ranks, key=lambda r: (r["step_s"], -r["rank"]))["class_id"]


def _headline_figure(heads: list[str], runs: list[RunDir]) -> dict[str, Any]:
    """Three panels: tokens/s per GPU, step time, peak memory (against the limit)."""
    panels = [("tokens/s per GPU", [r.plan.get("tokens_per_s_per_gpu") for r in runs], "#4C78A8"),
              ("step time, s", [r.plan.get("step_time_s") for r in runs], "#F58518"),
              ("peak GiB (highest rank)", [(r.plan.get("peak_bytes_max") or 0) / GIB
                                           for r in runs], "#54A24B")]
    data, lay = [], layout(height=380, showlegend=False)
    gap = 0.06
    width = (1 - 2 * gap) / 3
    notes = []
    for k, (title, ys, color) in enumerate(panels, 1):
        sx = "" if k == 1 else str(k)
        data.append(dict(type="bar", x=heads, y=ys, xaxis=f"x{sx}", yaxis=f"y{sx}", name=title,
                         marker=dict(color=[color if r.plan.get("fits") else "#C62828"
                                            for r in runs]),
                         hovertemplate=f"%{{x}}<br>{title}: %{{y:,.4g}}<extra></extra>"))
        lo = (k - 1) * (width + gap)
        lay[f"xaxis{sx}"] = dict(domain=[lo, lo + width], anchor=f"y{sx}", type="category",
                                 automargin=True)
        lay[f"yaxis{sx}"] = axis("", anchor=f"x{sx}")
        notes.append(dict(text=title, xref="paper", yref="paper", x=lo + width / 2, y=1.0,
                          xanchor="center", yanchor="bottom", showarrow=False,
                          font=dict(size=12)))
    limits = [r.memory_limit_bytes for r in runs]
    if any(limits):
        data.append(dict(type="scatter", mode="markers", x=heads, xaxis="x3", yaxis="y3",
                         y=[None if v is None else v / GIB for v in limits], name="memory limit",
                         marker=dict(symbol="line-ew-open", size=34, color=LIMIT_COLOR,
                                     line=dict(width=2.5)),
                         hovertemplate="%{x}<br>limit %{y:.2f} GiB<extra></extra>"))
    top = max(panels[2][1])
    lay["yaxis3"]["range"], above = memory_range(top, [v and v / GIB for v in limits])
    if above:
        lay["margin"]["t"] = 60
        notes.append(above_note(above, top, x=1 - width, xanchor="left") | dict(y=1.1))
    lay["annotations"] = notes
    return dict(data=data, layout=lay)


def _class_axis(heads: list[str], classes: list[dict[int, dict]]) -> list[list[str]]:
    """Two-level x: run, then its classes."""
    outer, inner = [], []
    for h, cl in zip(heads, classes):
        for cid in sorted(cl):
            outer.append(h)
            inner.append(f"class {cid} ({cl[cid]['ranks']:,} ranks)")
    return [outer, inner]


def _memory_figure(heads: list[str], runs: list[RunDir], classes: list[dict]) -> dict[str, Any]:
    x = _class_axis(heads, classes)
    rows = [cl[cid]["mem"] for cl in classes for cid in sorted(cl)]
    data = [dict(type="bar", name=cat, x=x, y=[r[f"{cat}_bytes"] / GIB for r in rows],
                 marker=dict(color=MEMORY_COLORS[cat]),
                 hovertemplate=f"%{{x}}<br>{cat}: %{{y:.4f}} GiB<extra></extra>")
            for cat in CATEGORIES]
    limits = [run.memory_limit_bytes for run, cl in zip(runs, classes) for _ in cl]
    if any(limits):
        data.append(dict(type="scatter", mode="markers", name="memory limit", x=x,
                         y=[None if v is None else v / GIB for v in limits],
                         marker=dict(symbol="line-ew-open", size=30, color=LIMIT_COLOR,
                                     line=dict(width=2.5)),
                         hovertemplate="%{x}<br>limit %{y:.2f} GiB<extra></extra>"))
    lay = layout(barmode="stack", height=420, xaxis=dict(type="multicategory", automargin=True),
                 yaxis=axis("GiB"))
    top = max(max(r["peak_bytes"], sum(r[f"{c}_bytes"] for c in CATEGORIES)) for r in rows) / GIB
    lay["yaxis"]["range"], above = memory_range(top, [v and v / GIB for v in limits])
    if above:
        lay["margin"]["t"] = 60
        lay["annotations"] = [above_note(above, top)]
    return dict(data=data, layout=lay)


def _time_figure(heads: list[str], classes: list[dict]) -> dict[str, Any]:
    x = _class_axis(heads, classes)
    rows = [cl[cid]["time"] for cl in classes for cid in sorted(cl)]
    data = [dict(type="bar", name=name, x=x, y=[r[col] * 1e3 for r in rows],
                 marker=dict(color=TIME_COLORS[name]),
                 hovertemplate=f"%{{x}}<br>{name}: %{{y:.4f}} ms<extra></extra>")
            for name, col in TIME_PARTS]
    data.append(dict(type="scatter", mode="markers", name="step", x=x,
                     y=[r["step_s"] * 1e3 for r in rows], marker=dict(symbol="diamond",
                                                                      color="#111", size=8),
                     hovertemplate="%{x}<br>step %{y:.4f} ms<extra></extra>"))
    return dict(data=data, layout=layout(barmode="stack", height=420,
                                         xaxis=dict(type="multicategory", automargin=True),
                                         yaxis=axis("ms")))


def _collectives_figure(heads: list[str], runs: list[RunDir]) -> dict[str, Any] | None:
    agg: list[dict[tuple[str, str], list[float]]] = []
    for run in runs:
        cid = binding_class(run.ranks)
        a: dict[tuple[str, str], list[float]] = {}
        for c in run.collectives:
            if c["class_id"] == cid:
                v = a.setdefault((c["kind"], c["mesh_dim"]), [0.0, 0.0])
                v[0] += c["bytes"] * c["count"]
                v[1] += c.get("est_time_s") or 0.0
        agg.append(a)
    keys = sorted({k for a in agg for k in a})
    if not keys:
        return None
    x = [f"{kind} / {dim}" for kind, dim in keys]
    data = [dict(type="bar", name=h, x=x, y=[a.get(k, [0, 0])[0] / GIB for k in keys],
                 customdata=[a.get(k, [0, 0])[1] * 1e3 for k in keys],
                 hovertemplate=f"{h}<br>%{{x}}: %{{y:.4g}} GiB, %{{customdata:.4f}} ms"
                               "<extra></extra>")
            for h, a in zip(heads, agg)]
    return dict(data=data, layout=layout(barmode="group", height=380,
                                         xaxis=dict(type="category", automargin=True),
                                         yaxis=axis("GiB moved (bytes × calls)")))


def compare_page(heads: list[str], runs: list[RunDir], sections: Sequence[Any]) -> Page:
    """`heads`: a short name per run; `sections`: compare's tables (each with .title and .rows,
    rows of (label, one cell per run))."""
    page = Page(title="simdist compare", generator=COMPARE_GENERATOR,
                subtitle=" · ".join(f"{h}: {r.path}" for h, r in zip(heads, runs)))
    classes = [per_class(r.ranks) for r in runs]
    page.section("headline", "the plans", "Red bars: the plan does not fit. Memory: the "
                 "highest per-GPU peak against the GPU's limit (red marks).")
    page.chart("compare-headline", _headline_figure(heads, runs))
    page.section("memory", "memory per rank class",
                 "Each class's highest-peak rank, by category, against its GPU's memory limit.")
    page.chart("compare-memory", _memory_figure(heads, runs, classes))
    page.section("time", "step time per rank class",
                 "Each class's slowest rank: compute, exposed communication, pipeline bubble; "
                 "diamonds: its step time.")
    page.chart("compare-time", _time_figure(heads, classes))
    fig = _collectives_figure(heads, runs)
    page.section("collectives", "collectives of each plan's slowest class",
                 "Bytes moved by kind and mesh dimension (hover: the time model's seconds).")
    if fig is None:
        page.note("No collectives in any plan.")
    else:
        page.chart("compare-collectives", fig)
    page.section("tables", "side by side", "Rows whose cells differ are shaded.")
    for sec in sections:
        page.subheading(sec.title)
        page.table([""] + heads, [[label, *cells] for label, cells in sec.rows],
                   row_classes=["diff" if len(set(cells)) > 1 else "" for _, cells in sec.rows])
    return page
