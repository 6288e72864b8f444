"""The dashboard in a real browser (#12 item 6): headless Chromium (Debian's `chromium`; .ci/run
installs it) loads each kind of report — run, sweep, search, compare — from a file:// URL with
every network request refused, and must show no console error and no page error, and every
chart of the page's figure list must have rendered: plotly's `.main-svg` exists and its plot
area holds drawn trace elements (paths with a non-empty box). The memory chart must draw a bar
per rank and category (counted from ranks.parquet). A screenshot of each kind goes to the test's
temporary directory, and with SIMDIST_SCREENSHOTS=DIR also to DIR (the README's pictures:
`SIMDIST_SCREENSHOTS=docs python -m pytest tests/test_report_browser.py`).

Skipped, with the reason, only when Chromium is not installed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simdist.report import REPORT_FILE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                             ".ci/run installs it)")
# Without the background-networking flags Chromium's own connections are refused on a closed
# network and the failures reach the console.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPECTED = {  # charts each kind must have (the page may have more)
    "run": {"memory-ranks", "memory-timeline", "step-timeline", "time-ranks",
            "collectives-time"},
    "sweep": {"sweep-throughput", "sweep-cost", "sweep-tokens", "sweep-peak",
              "best-memory-ranks", "best-time-ranks"},
    "search": {"sweep-throughput", "sweep-cost", "search-prior", "best-memory-ranks"},
    "compare": {"compare-headline", "compare-memory", "compare-time", "compare-collectives"},
}

# For each chart: its svg, the traces drawn, the drawn marks (paths with a box) and the bars.
_INSPECT = """
(ids) => ids.map((id) => {
  const el = document.getElementById(id);
  const plot = el && el.querySelector('.cartesianlayer');
  const marks = plot ? [...plot.querySelectorAll('.trace path')].filter((p) => {
    const b = p.getBBox();
    return (p.getAttribute('d') || '').length > 4 && (b.width > 0 || b.height > 0);
  }).length : 0;
  return {id: id, svg: el ? el.querySelectorAll('.main-svg').length : 0,
          traces: plot ? plot.querySelectorAll('.trace').length : 0, marks: marks,
          bars: plot ? plot.querySelectorAll('.barlayer .point').length : 0,
          data: el && el.data ? el.data.length : 0};
})
"""


def _page_path(report_dirs: dict, kind: str) -> Path:
    return report_dirs[kind] if kind == "compare" else report_dirs[kind] / REPORT_FILE


def _figures(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    start = text.index('id="simdist-figures">') + len('id="simdist-figures">')
    return json.loads(text[start:text.index("</script>", start)])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("kind", ["run", "sweep", "search", "compare"])
def test_report_renders_in_chromium(browser, report_dirs, kind, tmp_path):
    path = _page_path(report_dirs, kind)
    figures = _figures(path)
    assert EXPECTED[kind] <= set(figures), EXPECTED[kind] - set(figures)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

    def refuse(route):  # noqa: ANN001, ANN202 - the page must need nothing but itself
        if route.request.url.startswith("file://"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", refuse)
    try:
        page.goto(path.as_uri())
        page.wait_for_function("window.simdistCharts !== undefined", timeout=60_000)
        rendered = page.evaluate("window.simdistCharts")
        charts = page.evaluate(_INSPECT, list(figures))
        shot = tmp_path / f"report-{kind}.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert not errors, errors
    assert not outside, outside
    assert sorted(rendered) == sorted(figures)
    for c in charts:
        want = len(figures[c["id"]]["data"])
        assert c["svg"] >= 1, c  # plotly drew its svg
        assert c["data"] == want and c["traces"] >= 1, c
        assert c["marks"] > 0, c  # not blank: drawn bars, lines or markers
    if kind == "run":
        ranks = pq.read_table(report_dirs["run"] / "ranks.parquet").num_rows
        (mem,) = [c for c in charts if c["id"] == "memory-ranks"]
        assert mem["bars"] == 5 * ranks  # param, grad, optimizer, activation, other per rank
    assert shot.stat().st_size > 10_000
    if os.environ.get("SIMDIST_SCREENSHOTS"):
        dest = Path(os.environ["SIMDIST_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)
