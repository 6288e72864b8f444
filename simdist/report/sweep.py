"""The sections of a sweep or search directory: tokens/s and cost against GPUs with fit / no-fit
marked and the Pareto front, tokens/s and peak memory per plan, the ranked table (every skip
reason), for a search what was pruned and how the prior's order compared, and the best plan's
own run sections. From sweep.parquet, sweep.json, search.json and plans/<n>/ alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simdist.report.load import SweepDir
from simdist.report.page import (FIT_COLOR, GIB, LIMIT_COLOR, NOFIT_COLOR, Page, axis, fmt_num,
                                 layout)
from simdist.report.run import above_note, add_run_sections, memory_range

FIRST_METRIC = "plan_id"  # sweep.parquet: the plan's key columns come before it
SHORT = {"dp_replicate": "dpr", "dp_shard": "dps", "activation_checkpointing": "ac",
         "micro_batch": "mb", "pp_schedule": "sched", "zero_stage": "zero"}


def key_columns(sd: SweepDir) -> list[str]:
    cols = sd.columns
    return cols[:cols.index(FIRST_METRIC)] if FIRST_METRIC in cols else []


def varying(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The keys whose value differs between plans (a search's fixed dimensions say nothing)."""
    out = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]
    return out or keys


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


def plan_label(row: dict[str, Any], keys: list[str]) -> str:
    parts = []
    for k in keys:
        name = k.rsplit(".", 1)[-1]
        parts.append(f"{SHORT.get(name, name)}={_text(row.get(k))}")
    return " ".join(parts)


@dataclass
class Point:
    plan_id: int
    gpus: int
    value: float
    fits: bool
    label: str


def pareto_front(points: list[Point], maximize: bool) -> list[Point]:
    """The plans that fit and that no other fitting plan beats on both GPUs (fewer or as many)
    and the value (higher when `maximize`, else lower, or as good), in order of GPUs."""
    fit = [p for p in points if p.fits and p.value is not None]
    sign = -1.0 if maximize else 1.0
    fit.sort(key=lambda p: (p.gpus, sign * p.value, p.plan_id))
    front: list[Point] = []
    for p in fit:
        if not front or sign * p.value < sign * front[-1].value:
            front.append(p)
    return front


def gpu_hours_per_million(row: dict[str, Any]) -> float | None:
    """GPUs / 3600 / tokens_per_s x 1e6: the cost at a price of 1 per GPU-hour (search's
    `--objective cost` without a price)."""
    tps = row.get("tokens_per_s")
    return row["world_size"] / 3600.0 / tps * 1e6 if tps else None


def _scatter_figure(points: list[Point], front: list[Point], y_title: str,
                    y_hover: str) -> dict[str, Any]:
    data = []
    for fits, name, color, symbol in ((True, "fits", FIT_COLOR, "circle"),
                                      (False, "does not fit", NOFIT_COLOR, "x")):
        mine = [p for p in points if p.fits == fits]
        if mine:
            data.append(dict(type="scatter", mode="markers", name=name,
                             x=[p.gpus for p in mine], y=[p.value for p in mine],
                             text=[f"plan {p.plan_id}: {p.label}" for p in mine],
                             marker=dict(color=color, symbol=symbol, size=10,
                                         line=dict(width=1, color="#fff")),
                             hovertemplate=f"%{{text}}<br>%{{x}} GPUs<br>{y_hover}: %{{y:,.4g}}"
                                           "<extra></extra>"))
    if front:
        data.append(dict(type="scatter", mode="lines+markers", name="Pareto front (fits)",
                         x=[p.gpus for p in front], y=[p.value for p in front],
                         text=[f"plan {p.plan_id}: {p.label}" for p in front],
                         line=dict(color="#111", dash="dot", width=1.5, shape="hv"),
                         marker=dict(color="rgba(0,0,0,0)", size=16,
                                     line=dict(color="#111", width=1.5)),
                         hovertemplate="front: %{text}<extra></extra>"))
    gpus = sorted({p.gpus for p in points})
    xa = axis("GPUs", type="log" if len(gpus) > 2 and gpus[-1] / gpus[0] >= 8 else "linear")
    if len(gpus) <= 12:
        xa.update(tickmode="array", tickvals=gpus)
    return dict(data=data, layout=layout(height=400, xaxis=xa, yaxis=axis(y_title)))


def _bars_figure(rows: list[dict[str, Any]], labels: list[str], values: list[float],
                 y_title: str, hover: str, limits: list[float | None] | None = None) -> dict:
    data = []
    for fits, name, color in ((True, "fits", FIT_COLOR), (False, "does not fit", NOFIT_COLOR)):
        idx = [i for i, r in enumerate(rows) if bool(r["fits"]) == fits]
        if idx:
            data.append(dict(type="bar", name=name, x=[labels[i] for i in idx],
                             y=[values[i] for i in idx], marker=dict(color=color),
                             hovertemplate=f"%{{x}}<br>{hover}: %{{y:,.4g}}<extra></extra>"))
    if limits and any(v is not None for v in limits):
        data.append(dict(type="scatter", mode="markers", name="memory limit", x=labels,
                         y=limits, marker=dict(symbol="line-ew-open", size=30,
                                               color=LIMIT_COLOR, line=dict(width=2.5)),
                         hovertemplate="%{x}<br>limit %{y:.2f} GiB<extra></extra>"))
    lay = layout(height=400, barmode="overlay", bargap=0.3,
                 xaxis=dict(type="category", categoryorder="array", categoryarray=labels,
                            automargin=True, tickangle=-30 if len(labels) > 6 else 0),
                 yaxis=axis(y_title))
    if limits is not None:
        top = max(values)
        lay["yaxis"]["range"], above = memory_range(top, limits)
        if above:
            lay["margin"]["t"] = 60
            lay["annotations"] = [above_note(above, top)]
    return dict(data=data, layout=lay)


def sweep_page(sd: SweepDir) -> Page:
    mark = sd.marker
    rows = sd.rows
    keys = key_columns(sd)
    show = varying(rows, keys)
    kind = sd.kind
    ranked = sorted(rows, key=lambda r: (r.get("order") is None, r.get("order") or 0,
                                         r["plan_id"]))
    sim = [r for r in ranked if r["status"] == "simulated"]
    search = sd.search if kind == "search" else None
    what = Path(mark["config"]).name if mark.get("config") else ""
    page = Page(title=f"simdist {kind}" + (f": {what}" if what else ""),
                subtitle=f"{len(rows):,} plans · simdist {mark.get('simdist_version', '?')}")
    label = {r["plan_id"]: plan_label(r, show) for r in rows}

    page.section("summary", "summary",
                 ("Every plan of the grid " + ", ".join(
                     f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in
                     (mark.get("grid") or {}).items()) + "; " if kind == "sweep" else "")
                 + "figures are simulated (fake-tensor execution and the time model); plans "
                   "are ranked: those that fit first, then "
                 + ("by tokens/s." if kind == "sweep"
                    else f"by {search and search.get('objective')}."))
    best = sim[0] if sim else None
    cards = [("plans", fmt_num(len(rows), ","), ""),
             ("simulated", fmt_num(len(sim), ","), ""),
             ("fit", fmt_num(sum(1 for r in sim if r["fits"]), ","),
              "good" if any(r["fits"] for r in sim) else "bad"),
             ("skipped", fmt_num(sum(r["status"] == "skipped" for r in rows), ","), ""),
             ("failed", fmt_num(sum(r["status"] == "failed" for r in rows), ","),
              "bad" if any(r["status"] == "failed" for r in rows) else "")]
    if search:
        cards = [("enumerated", fmt_num(search.get("enumerated"), ","), ""),
                 ("pruned before executing", fmt_num(search.get("pruned_total"), ","), ""),
                 ("candidates", fmt_num(search.get("candidates"), ","), "")] + cards
    if best is not None:
        cards.append(("best plan", f"plan {best['plan_id']}: {label[best['plan_id']]}", "wide"))
        cards.append(("its tokens/s", fmt_num(best["tokens_per_s"], ",.0f"), ""))
        if best.get("cost_per_million_tokens") is not None:
            cards.append(("its cost per million tokens",
                          fmt_num(best["cost_per_million_tokens"], ".4g"), ""))
    page.cards(cards)

    if sim:
        points = [Point(r["plan_id"], r["world_size"], r["tokens_per_s"], bool(r["fits"]),
                        label[r["plan_id"]]) for r in sim]
        page.section("throughput", "tokens/s against GPUs")
        page.chart("sweep-throughput", _scatter_figure(
            points, pareto_front(points, maximize=True), "tokens/s", "tokens/s"),
            "Each simulated plan at its GPU count; green: fits in memory, red ×: does not. "
            "Dotted: the Pareto front of the plans that fit (no other plan that fits is as "
            "fast on as few GPUs).")
        priced = all(r.get("cost_per_million_tokens") is not None for r in sim)
        cost_of = ((lambda r: r["cost_per_million_tokens"]) if priced else gpu_hours_per_million)
        what_cost = "cost per million tokens" if priced else "GPU-hours per million tokens"
        cpoints = [Point(r["plan_id"], r["world_size"], cost_of(r), bool(r["fits"]),
                         label[r["plan_id"]]) for r in sim]
        page.section("cost", f"{what_cost} against GPUs")
        page.chart("sweep-cost", _scatter_figure(
            cpoints, pareto_front(cpoints, maximize=False), what_cost, what_cost),
            ("cost_per_million_tokens = price per GPU-hour × GPUs / 3600 / tokens/s × 10⁶."
             if priced else "No cluster.price_per_gpu_hour: GPU-hours per million tokens = "
                            "GPUs / 3600 / tokens/s × 10⁶ (the cost at a price of 1).")
            + " Dotted: the Pareto front of the plans that fit (none is cheaper on as few "
              "GPUs).")

        names = [f"#{r['order']} plan {r['plan_id']}: {label[r['plan_id']]}" for r in sim]
        page.section("plans", "tokens/s and peak memory per plan")
        page.chart("sweep-tokens", _bars_figure(
            sim, names, [r["tokens_per_s"] for r in sim], "tokens/s", "tokens/s"),
            "Simulated plans in ranked order.")
        limits = []
        for r in sim:
            if search and search.get("memory_limit_bytes"):
                limits.append(search["memory_limit_bytes"] / GIB)
                continue
            rd = sd.plan_dir(r)
            lim = rd.memory_limit_bytes if rd is not None else None
            limits.append(None if lim is None else lim / GIB)
        page.chart("sweep-peak", _bars_figure(
            sim, names, [r["peak_bytes_max"] / GIB for r in sim], "peak GiB (highest rank)",
            "peak GiB", limits),
            "The highest per-GPU peak of each plan against its GPU's memory limit (HBM less "
            "1 GiB reserved).")
        if search and all(r.get("prior_tokens_per_s") is not None for r in sim):
            page.section("prior", "the prior's estimate against the simulation")
            page.chart("search-prior", _prior_figure(sim, label),
                       "The analytical prior only orders the simulations (best first); every "
                       "figure reported comes from simulation. Points on the diagonal: the "
                       "prior's estimate was the simulated tokens/s.")

    page.section("table", "every plan, ranked",
                 "A skipped plan was invalid (the config error is its reason); a failed one hit "
                 "an internal error. `simdist report DIR/plans/<n>` builds a plan's own page.")
    price = any(r.get("cost_per_million_tokens") is not None for r in rows)
    heads = ["#", "plan"] + [k for k in show] + ["status", "fits", "GPUs", "peak GiB", "step s",
                                                 "MFU %", "tokens/s", "tokens/s/GPU"]
    heads += ["cost/M tokens"] if price else []
    heads += ["run dir or reason"]
    body, classes = [], []
    for r in ranked:
        cells = [_text(r.get("order")), str(r["plan_id"])] + [_text(r.get(k)) for k in show]
        cells.append(r["status"])
        if r["status"] == "simulated":
            cells += [_text(r["fits"]), fmt_num(r["world_size"], ","),
                      f"{r['peak_bytes_max'] / GIB:.3f}", f"{r['step_time_s']:.4g}",
                      f"{100 * r['mfu']:.2f}", fmt_num(r["tokens_per_s"], ",.0f"),
                      fmt_num(r["tokens_per_s_per_gpu"], ",.0f")]
            if price:
                cells.append(fmt_num(r.get("cost_per_million_tokens"), ".4g"))
            cells.append(r.get("run_dir") or "")
            classes.append("" if r["fits"] else "bad")
        else:
            cells += ["", fmt_num(r.get("world_size"), ","), "", "", "", "", ""]
            cells += [""] if price else []
            cells.append(r.get("skip_reason") or "")
            classes.append("bad")
        body.append(cells)
    page.table(heads, body, text_cols=0, left=(1, -1), row_classes=classes, limit=500)

    if search:
        page.section("pruned", "pruned before executing",
                     f"{fmt_num(search.get('enumerated'), ',')} plans enumerated for "
                     f"{', '.join(map(str, search.get('gpus') or []))} GPUs; each pruned plan "
                     "broke the first rule listed (divisibility, or the memory lower bound of "
                     "its model states).")
        page.table(["reason", "plans"], [[k, fmt_num(v, ",")] for k, v in
                                         (search.get("pruned") or {}).items()])
        page.preformatted("the prior (search.json)", search.get("prior") or "")

    if best is not None and (rd := sd.plan_dir(best)) is not None:
        add_run_sections(page, rd, prefix="best-",
                         title=f"best plan ({best['run_dir']})")
    return page


def _prior_figure(sim: list[dict[str, Any]], label: dict[int, str]) -> dict[str, Any]:
    xs = [r["prior_tokens_per_s"] for r in sim]
    ys = [r["tokens_per_s"] for r in sim]
    hi = max(xs + ys) * 1.1
    data = [dict(type="scatter", mode="lines", name="prior = simulated", x=[0, hi], y=[0, hi],
                 line=dict(color="#999", dash="dash"), hoverinfo="skip")]
    for fits, name, color in ((True, "fits", FIT_COLOR), (False, "does not fit", NOFIT_COLOR)):
        mine = [r for r in sim if bool(r["fits"]) == fits]
        if mine:
            data.append(dict(type="scatter", mode="markers", name=name,
                             x=[r["prior_tokens_per_s"] for r in mine],
                             y=[r["tokens_per_s"] for r in mine],
                             text=[f"plan {r['plan_id']}: {label[r['plan_id']]}" for r in mine],
                             marker=dict(color=color, size=9),
                             hovertemplate="%{text}<br>prior %{x:,.0f}<br>simulated %{y:,.0f}"
                                           "<extra></extra>"))
    return dict(data=data, layout=layout(height=400, xaxis=axis("prior tokens/s"),
                                         yaxis=axis("simulated tokens/s")))
