"""The dashboard: one self-contained `report.html` per run, sweep, search or comparison, built
from the output directory's files alone (plan.json, the Parquet tables, timeline.json,
sweep.parquet, search.json). Never imports the simulator (simdist.mode): a report can be rebuilt
anywhere the directory is copied, with `simdist report DIR`.

Charts are Plotly (plotly.js, embedded from the `plotly` Python package's offline bundle):
well kept (MIT, releases every few weeks, a large user base), the whole library in one
offline file so the page needs no network and no server at view time, interactive (hover,
zoom, legend toggles) and drawn as SVG (WebGL only where a trace asks for it; these charts do
not), so it renders in any browser, headless ones included. Figures are plain JSON
({data, layout}) written here, so building a page imports only the bundle, not plotly's Python
graph objects. The bundle is ~4.8 MB; a sweep writes one page for the whole sweep (its plans'
run directories get one from `simdist report DIR/plans/<n>`), not one per plan.
"""

from __future__ import annotations

import os
from pathlib import Path

from simdist.report.load import REPORT_FILE, RunDir, SweepDir, open_output

__all__ = ["REPORT_FILE", "ReportWarning", "RunDir", "SweepDir", "build_page", "write_report",
           "write_report_or_warn", "report_command"]


class ReportWarning(UserWarning):
    """report.html could not be built; the directory's data is written all the same."""


def build_page(out: RunDir | SweepDir):  # noqa: ANN201 - simdist.report.page.Page
    if isinstance(out, RunDir):
        from simdist.report.run import run_page

        return run_page(out)
    from simdist.report.sweep import sweep_page

    return sweep_page(out)


def write_report(directory: str | os.PathLike | RunDir | SweepDir, key: str = "DIR") -> Path:
    """(Re)build DIR/report.html from DIR's files; ConfigError(key) when DIR is not a simdist
    output directory or a file it needs is missing, unreadable or not writable."""
    from simdist.config import ConfigError
    from simdist.report.page import write_atomic

    out = directory if isinstance(directory, (RunDir, SweepDir)) else open_output(directory, key)
    text = build_page(out).html()
    target = out.path / REPORT_FILE
    try:
        return write_atomic(target, text)
    except OSError as e:
        raise ConfigError(key, f"cannot write {target}: {e.strerror or e}") from None


def write_report_or_warn(directory: str | os.PathLike | RunDir | SweepDir) -> Path | None:
    """write_report for a directory simdist is writing: the simulation's files are the result,
    the page is derived from them, so a failure to build it is a ReportWarning (the CLI prints
    one line) and the run, sweep or search is written without it."""
    import warnings

    from simdist.errors import one_line

    try:
        return write_report(directory)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the data is kept
        warnings.warn(f"report.html not written ({one_line(e)}); `simdist report DIR` "
                      "rebuilds it from the directory", ReportWarning, stacklevel=2)
        return None


def report_command(directory: str) -> int:
    print(f"wrote {write_report(directory)}")
    return 0
