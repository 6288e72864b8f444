"""One self-contained HTML page: headings, summary cards, tables and Plotly charts, with
plotly.js embedded (no network at view time) and every figure as JSON in the page; written
atomically (a temporary file beside the target, then renamed)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

GIB = 2**30

# Colours: one per memory category, time part and phase, the same in every chart.
MEMORY_COLORS = {"param": "#4C78A8", "grad": "#F58518", "optimizer": "#54A24B",
                 "activation": "#E45756", "other": "#B5B5B5"}
TIME_COLORS = {"compute": "#4C78A8", "exposed comm": "#E45756", "bubble": "#EECA3B",
               "other idle": "#C8C8C8"}
PHASE_COLORS = {"init": "#9D755D", "fwd": "#4C78A8", "bwd": "#F58518", "optim": "#54A24B"}
FIT_COLOR, NOFIT_COLOR, LIMIT_COLOR = "#2E7D32", "#C62828", "#C62828"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#1f2937;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:1.35em}header p{margin:4px 0 0;color:#cbd5e1;font-size:.9em}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 28px;z-index:9;
font-size:.88em}nav a{margin-right:14px;color:#1d4ed8;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
section{margin:18px 0 26px}h2{font-size:1.12em;margin:22px 0 6px;border-bottom:1px solid #e5e5e5;
padding-bottom:3px}h3{font-size:1em;margin:14px 0 4px}
.note{color:#555;font-size:.86em;margin:2px 0 6px;max-width:1100px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card .v{font-size:1.25em;font-weight:600;font-variant-numeric:tabular-nums}
.card .l{font-size:.78em;color:#666}
.card.good .v{color:#2E7D32}.card.bad .v{color:#C62828}.card.wide{max-width:560px}
.card.wide .v{font-size:.95em;font-weight:500}
.chart{background:#fff;border:1px solid #e2e2e2;border-radius:6px;min-height:200px}
table{border-collapse:collapse;margin:4px 0 8px;background:#fff;font-size:.85em}
th,td{border:1px solid #d5d5d5;padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}thead th{background:#f0f0f0}
td.text,th.text{text-align:left}td.text{max-width:420px;overflow-wrap:anywhere}
.scroll{max-width:100%;overflow-x:auto}tr.diff td{background:#fff7e0}tr.bad td{color:#8a1c1c}
details{margin:6px 0}summary{cursor:pointer;color:#1d4ed8}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:.8em}
"""

# Renders every figure of the page; an error is shown in the chart's place (and reaches the
# console, where the browser test looks for it).
_RENDER = """
(function(){
  var figs = JSON.parse(document.getElementById('simdist-figures').textContent);
  var config = {displaylogo: false, responsive: true};
  Object.keys(figs).forEach(function(id){
    var el = document.getElementById(id);
    try { Plotly.newPlot(el, figs[id].data, figs[id].layout, config); }
    catch (e) { el.textContent = 'chart failed: ' + e; console.error('chart ' + id + ': ' + e); }
  });
  window.simdistCharts = Object.keys(figs);
})();
"""


def plotly_js() -> str:
    """plotly.js as the `plotly` Python package ships it (plotly.offline.get_plotlyjs reads the
    same file), read as a resource so that building a page does not import plotly's Python
    side."""
    return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text("utf-8")


def plotly_js_version(js: str) -> str:
    m = re.search(r"plotly\.js v([0-9][0-9.]*)", js[:2000])
    return m.group(1) if m else "unknown"


def gib(b: float | None) -> float | None:
    return None if b is None else b / GIB


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return ""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_num(x: Any, spec: str = ",.4g") -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def layout(title: str | None = None, **kw: Any) -> dict[str, Any]:
    """The layout every chart starts from."""
    out: dict[str, Any] = dict(
        height=420, margin=dict(l=70, r=30, t=40 if title else 20, b=60),
        font=dict(family="system-ui, sans-serif", size=12), plot_bgcolor="#fff",
        paper_bgcolor="#fff", hovermode="closest",
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0, xanchor="left"))
    if title:
        out["title"] = dict(text=title, x=0.01, font=dict(size=13))
    out.update(kw)
    return out


def axis(title: str, **kw: Any) -> dict[str, Any]:
    return dict(title=dict(text=title), gridcolor="#eee", zerolinecolor="#ccc", **kw)


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and infinities as null (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def script_json(data: Any) -> str:
    """JSON to sit inside a <script> element: '<' escaped so no '</script>' can end it early."""
    return json.dumps(_clean(data), separators=(",", ":"), default=str).replace("<", "\\u003c")


@dataclass
class Page:
    title: str
    subtitle: str = ""
    generator: str = "simdist report"  # <meta name="generator">: what may replace the file
    body: list[str] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    nav: list[tuple[str, str]] = field(default_factory=list)

    def section(self, anchor: str, title: str, note: str = "", nav: str | None = "") -> None:
        """`nav`: the link's text ('' the title; None: no link)."""
        anchor = f"sec-{anchor}"  # never a chart's id
        if nav is not None:
            self.nav.append((anchor, nav or title))
        self.body.append(f'<h2 id="{html.escape(anchor)}">{html.escape(title)}</h2>')
        if note:
            self.note(note)

    def subheading(self, text: str) -> None:
        self.body.append(f"<h3>{html.escape(text)}</h3>")

    def note(self, text: str) -> None:
        self.body.append(f'<p class="note">{html.escape(text)}</p>')

    def cards(self, items: list[tuple[str, str, str]]) -> None:
        """(label, value, css class: '', 'good', 'bad' or 'wide')."""
        out = ['<div class="cards">']
        for label, value, cls in items:
            out.append(f'<div class="card {cls}"><div class="v">{html.escape(value)}</div>'
                       f'<div class="l">{html.escape(label)}</div></div>')
        out.append("</div>")
        self.body.append("".join(out))

    def chart(self, chart_id: str, figure: dict[str, Any], note: str = "") -> None:
        if chart_id in self.figures:
            raise ValueError(f"chart id {chart_id!r} used twice")
        self.figures[chart_id] = figure
        height = figure.get("layout", {}).get("height", 420)
        self.body.append(f'<div class="chart" id="{html.escape(chart_id)}" '
                         f'style="height:{int(height)}px"></div>')
        if note:
            self.note(note)

    def table(self, headers: list[str], rows: list[list[str]], *, text_cols: int = 1,
              left: tuple[int, ...] = (), row_classes: list[str] | None = None,
              limit: int | None = None, folded: str | None = None) -> None:
        """Cells are text; the first `text_cols` columns and those in `left` (negative: from
        the end) are left-aligned, the rest (numbers) right-aligned."""
        e = html.escape
        shown = rows if limit is None else rows[:limit]
        n = len(headers)
        lefts = {i % n for i in left} if n else set()

        def cell(tag: str, i: int, text: str) -> str:
            cls = ' class="text"' if i < text_cols or i in lefts else ""
            return f"<{tag}{cls}>{e(text)}</{tag}>"

        out = ['<div class="scroll"><table><thead><tr>'
               + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr></thead><tbody>"]
        for j, r in enumerate(shown):
            cls = row_classes[j] if row_classes and row_classes[j] else ""
            attr = f' class="{cls}"' if cls else ""
            out.append(f"<tr{attr}>" + "".join(cell("td", i, c) for i, c in enumerate(r))
                       + "</tr>")
        out.append("</tbody></table></div>")
        text = "".join(out)
        if folded is not None:
            text = f"<details><summary>{e(folded)}</summary>{text}</details>"
        self.body.append(text)
        if limit is not None and len(rows) > limit:
            self.note(f"... and {len(rows) - limit:,} more rows (in the Parquet file).")

    def preformatted(self, summary: str, text: str) -> None:
        self.body.append(f"<details><summary>{html.escape(summary)}</summary>"
                         f"<pre>{html.escape(text)}</pre></details>")

    def html(self) -> str:
        e = html.escape
        js = plotly_js()
        nav = "".join(f'<a href="#{e(a)}">{e(t)}</a>' for a, t in self.nav)
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta name="generator" content="{e(self.generator)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title>",
            f"<style>{_CSS}</style>",
            f"<!-- plotly.js v{e(plotly_js_version(js))} (MIT licence), embedded: the page "
            "needs no network -->",
            "<script>" + js.replace("</script", "<\\/script") + "</script>",
            "</head><body>",
            f"<header><h1>{e(self.title)}</h1>"
            + (f"<p>{e(self.subtitle)}</p>" if self.subtitle else "") + "</header>",
            f"<nav>{nav}</nav>" if nav else "",
            "<main>", *self.body, "</main>",
            '<script type="application/json" id="simdist-figures">'
            + script_json(self.figures) + "</script>",
            f"<script>{_RENDER}</script>",
            "</body></html>",
        ]) + "\n"


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, renamed over it: a reader
    sees the old file or the new one, never half of one. OSError as raised."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
