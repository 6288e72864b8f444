"""The dashboard's data (#12 item 6), without a browser: every chart's numbers against the files
it is built from, read independently (pyarrow, DuckDB, the Chrome trace JSON), the Pareto front
against a brute-force dominance check, `simdist report` on good and bad directories, and the
rule that the report reads files only (never simdist.mode). tests/test_report_browser.py renders
the same pages in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simdist.report import REPORT_FILE, ReportWarning, write_report, write_report_or_warn
from simdist.report.load import RunDir, open_output
from simdist.report.page import GIB, Page, script_json, write_atomic
from simdist.report.run import (CATEGORIES, Span, coarsen, collective_groups, decimate,
                                memory_ranks_figure, memory_timeline_figure, step_streams,
                                step_timeline_figure, time_ranks_figure)
from simdist.report.sweep import Point, pareto_front

REPO = Path(__file__).resolve().parents[1]


def _trace(fig: dict, name: str) -> dict:
    (t,) = [t for t in fig["data"] if t.get("name") == name]
    return t


def _figures(html_text: str) -> dict:
    start = html_text.index('id="simdist-figures">') + len('id="simdist-figures">')
    return json.loads(html_text[start:html_text.index("</script>", start)])


# ------------------------------------------------------------------------------------------
# What simdist writes


def test_every_kind_writes_its_report(report_dirs):
    # ClusterPlan.write (simdist run), run_sweep and run_search build report.html themselves;
    # a sweep's plans get none (one page per sweep: the page embeds ~4.8 MB of plotly.js).
    for kind in ("run", "sweep", "search"):
        assert (report_dirs[kind] / REPORT_FILE).is_file(), kind
    assert not list((report_dirs["sweep"] / "plans").glob(f"*/{REPORT_FILE}"))
    assert report_dirs["compare"].is_file()
    for path in (report_dirs["run"] / REPORT_FILE, report_dirs["compare"]):
        text = path.read_text()
        assert "plotly.js v" in text[:6000]  # the library is in the page
        # nothing is fetched: no external script, stylesheet or image
        assert "<script src" not in text and "<link" not in text and "<img" not in text


def test_report_command_rebuilds_the_same_page(report_dirs, tmp_path, capsys):
    from simdist.cli import main

    run = tmp_path / "run"
    shutil.copytree(report_dirs["run"], run)
    before = (run / REPORT_FILE).read_text()
    (run / REPORT_FILE).unlink()
    assert main(["report", str(run)]) == 0
    assert f"wrote {run / REPORT_FILE}" in capsys.readouterr().out
    assert (run / REPORT_FILE).read_text() == before  # a function of the directory's files
    plan = report_dirs["sweep"] / "plans" / "0"
    copy = tmp_path / "plan0"
    shutil.copytree(plan, copy)
    assert main(["report", str(copy)]) == 0 and (copy / REPORT_FILE).is_file()
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("what", ["missing", "file", "other-dir", "plan-without-marker"])
def test_report_command_refuses_what_simdist_did_not_write(tmp_path, capsys, what):
    from simdist.cli import main

    target = tmp_path / "x"
    if what == "file":
        target.write_text("hello")
    elif what == "other-dir":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif what == "plan-without-marker":
        target.mkdir()
        (target / "plan.json").write_text('{"world_size": 8}')
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else None
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simdist: invalid input: DIR: ") and "Traceback" not in err
    assert "simdist run, sweep or search" in err and str(target) in err
    if before is not None:
        assert sorted(p.name for p in target.iterdir()) == before  # nothing written there


def test_report_command_names_a_missing_table(report_dirs, tmp_path, capsys):
    from simdist.cli import main

    run = tmp_path / "run"
    shutil.copytree(report_dirs["run"], run)
    (run / "ranks.parquet").unlink()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "ranks.parquet is missing" in err and "Traceback" not in err


def test_report_reads_files_only(report_dirs, tmp_path):
    """Rebuilding a page imports neither simdist.mode nor torch nor ray (a fresh interpreter)."""
    run = tmp_path / "run"
    shutil.copytree(report_dirs["run"], run)
    code = ("import sys; from simdist.report import write_report; "
            f"write_report({str(run)!r}); "
            "bad = sorted(m for m in sys.modules "
            "if m.startswith(('simdist.mode', 'torch', 'ray')));"
            "print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_failing_page_is_a_warning_not_a_lost_run(report_dirs, tmp_path, monkeypatch):
    import simdist.report as report

    run = tmp_path / "run"
    shutil.copytree(report_dirs["run"], run)
    (run / REPORT_FILE).unlink()

    def broken(out):  # noqa: ANN001, ANN202
        raise RuntimeError("chart bug")

    monkeypatch.setattr(report, "build_page", broken)
    with pytest.warns(ReportWarning, match="chart bug.*simdist report DIR"):
        assert write_report_or_warn(RunDir(run)) is None
    assert not (run / REPORT_FILE).exists() and (run / "ranks.parquet").exists()


def test_write_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    write_atomic(target, "old")
    assert target.read_text() == "old"
    write_atomic(target, "new")
    assert target.read_text() == "new"

    def failing(*a):  # noqa: ANN002, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        write_atomic(target, "newer")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temporary is gone


def test_figure_json_cannot_close_its_script_element():
    text = script_json({"name": "</script><script>alert(1)</script>", "v": float("nan")})
    assert "</script" not in text and "<" not in text
    assert json.loads(text) == {"name": "</script><script>alert(1)</script>", "v": None}
    page = Page("t")
    page.chart("a", {"data": [], "layout": {}})
    with pytest.raises(ValueError):
        page.chart("a", {"data": [], "layout": {}})


# ------------------------------------------------------------------------------------------
# A run's charts against its files


def test_memory_bars_are_the_ranks_table(report_dirs):
    run = RunDir(report_dirs["run"])
    fig, _ = memory_ranks_figure(run)
    ranks = pq.read_table(report_dirs["run"] / "ranks.parquet").to_pylist()
    assert len(ranks) == 8  # dp_shard 2 x tp 2 x pp 2: a bar per rank
    for cat in CATEGORIES:
        t = _trace(fig, cat)
        assert t["x"] == [r["rank"] for r in ranks]
        assert [round(y * GIB) for y in t["y"]] == [r[f"{cat}_bytes"] for r in ranks]
    marks = [t for t in fig["data"] if t["type"] == "scatter"]
    assert {t["name"] for t in marks} == {"peak GiB, class 0", "peak GiB, class 1"}  # 2 classes
    got = {x: round(y * GIB) for t in marks for x, y in zip(t["x"], t["y"])}
    assert got == {r["rank"]: r["peak_bytes"] for r in ranks}
    limit = json.loads((report_dirs["run"] / "plan.json").read_text())["memory_limit_bytes"]
    (line,) = fig["layout"]["shapes"]
    assert line["y0"] * GIB == pytest.approx(limit)


def test_many_ranks_share_bars_by_class(report_dirs, monkeypatch):
    import simdist.report.run as run_mod

    monkeypatch.setattr(run_mod, "RANK_BARS_MAX", 4)  # 8 ranks > 4: aggregated
    fig, note = memory_ranks_figure(RunDir(report_dirs["run"]))
    ranks = pq.read_table(report_dirs["run"] / "ranks.parquet").to_pylist()
    # Memory is a class's property: one bar per class (2), each standing for its 4 ranks.
    assert len(_trace(fig, "param")["x"]) == len({r["class_id"] for r in ranks}) == 2
    assert all("4 ranks" in x for x in _trace(fig, "param")["x"]) and "share a bar" in note


def test_memory_timeline_peak_is_the_peak_ranks_peak(report_dirs):
    fig, _ = memory_timeline_figure(RunDir(report_dirs["run"]))
    plan = json.loads((report_dirs["run"] / "plan.json").read_text())
    live = _trace(fig, "live bytes")
    # memory.parquet's live bytes (the recorder's timeline) peak at ranks.parquet's peak_bytes
    # of the plan's peak rank: two tables, one number.
    assert round(max(live["y"]) * GIB) == plan["peak_bytes_max"]
    mem = pq.read_table(report_dirs["run"] / "memory.parquet").to_pylist()
    cid = next(r["class_id"] for r in pq.read_table(report_dirs["run"] / "ranks.parquet")
               .to_pylist() if r["rank"] == plan["peak_rank"])
    phases = {m["phase"] for m in mem if m["class_id"] == cid}
    assert {t["name"] for t in fig["data"]} == phases | {"live bytes"}


def test_decimate_keeps_every_bucket_extreme():
    values = [(i * 7919) % 1000 for i in range(100_000)]
    values[31_337] = 5000  # a single spike
    keep = decimate(values, 1000)
    assert len(keep) <= 1000 + 1 and keep == sorted(keep)
    assert 31_337 in keep and keep[-1] == len(values) - 1
    assert min(values[i] for i in keep) == min(values)
    assert decimate([3, 1, 2], 10) == [0, 1, 2]


def test_step_chart_is_the_timeline(report_dirs):
    run = RunDir(report_dirs["run"])
    fig, _ = step_timeline_figure(run)
    events = json.loads((report_dirs["run"] / "timeline.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    # Two classes, fewer spans than STEP_SPANS_MAX: every span of timeline.json is a bar.
    bars = [(y, b, x) for t in fig["data"] for y, b, x in zip(t["y"], t["base"], t["x"])]
    assert len(bars) == len(spans)
    assert sum(x for _, _, x in bars) == pytest.approx(sum(e["dur"] for e in spans) / 1e3)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    rows = {f"class {p} · {name}" for (p, _), name in threads.items()}
    assert {y for y, _, _ in bars} == rows
    # the slowest rank's class comes first, its compute stream on top
    slow = json.loads((report_dirs["run"] / "plan.json").read_text())["time_breakdown"]["rank"]
    cls = next(r["class_id"] for r in run.ranks if r["rank"] == slow)
    assert fig["layout"]["yaxis"]["categoryarray"][-1] == f"class {cls} · compute"


def test_coarsen_merges_within_a_stream_and_phase_only():
    spans = [Span("a", 10 * i, 10 * i + 6, "fwd" if i < 50 else "bwd", f"m{i}")
             for i in range(100)] + [Span("b", 10 * i, 10 * i + 2, "fwd", "x") for i in range(100)]
    out, gap = coarsen(spans, 10)
    assert len(out) <= 10 and gap > 0
    # each merged span stays inside one row and one phase: a fwd span never covers a bwd one
    for s in out:
        members = [t for t in spans if t.row == s.row and s.start <= t.start and t.end <= s.end]
        assert members and {t.phase for t in members} == {s.phase}
    # merging only fills gaps: every original span is covered
    for t in spans:
        assert any(s.row == t.row and s.start <= t.start and t.end <= s.end for s in out)
    assert coarsen(spans, 1000) == (spans, 0.0)


def test_step_time_bars_are_the_ranks_table(report_dirs):
    fig, _ = time_ranks_figure(RunDir(report_dirs["run"]))
    ranks = pq.read_table(report_dirs["run"] / "ranks.parquet").to_pylist()
    for name, col in (("compute", "compute_s"), ("exposed comm", "exposed_comm_s"),
                      ("bubble", "bubble_s")):
        assert _trace(fig, name)["y"] == pytest.approx([r[col] * 1e3 for r in ranks])
    assert any(r["bubble_s"] > 0 for r in ranks)  # pp=2: a bubble to show
    marks = [t for t in fig["data"] if t["type"] == "scatter"]
    got = {x: y for t in marks for x, y in zip(t["x"], t["y"])}
    assert got == pytest.approx({r["rank"]: r["step_s"] * 1e3 for r in ranks})


def test_collectives_table_sums_agree_with_duckdb(report_dirs):
    duckdb = pytest.importorskip("duckdb")
    run = RunDir(report_dirs["run"])
    groups = collective_groups(run.collectives)
    path = report_dirs["run"] / "collectives.parquet"
    want = duckdb.sql(f"""
        SELECT class_id, kind, mesh_dim, group_size, phase, sum(count), sum(bytes * count),
               sum(est_time_s)
        FROM read_parquet('{path}') GROUP BY ALL""").fetchall()
    got = {(g.class_id, g.kind, g.mesh_dim, g.group_size, g.phase): (g.calls, g.bytes, g.seconds)
           for g in groups}
    assert len(got) == len(want) > 0
    for *key, calls, byts, secs in want:
        assert got[tuple(key)][:2] == (calls, byts)
        assert got[tuple(key)][2] == pytest.approx(secs)


def test_step_streams_ignore_unknown_classes():
    tl = {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "class 0"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "tp"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "compute"}},
        {"name": "m", "cat": "fwd", "ph": "X", "ts": 0, "dur": 5, "pid": 0, "tid": 1},
        {"name": "m", "cat": "fwd", "ph": "X", "ts": 0, "dur": 3, "pid": 0, "tid": 0},
        {"name": "m", "cat": "fwd", "ph": "X", "ts": 0, "dur": 3, "pid": 7, "tid": 0}]}
    rows, spans, _ = step_streams(tl, [0])
    assert rows == ["class 0 · compute", "class 0 · tp"] and len(spans) == 2


# ------------------------------------------------------------------------------------------
# Sweeps and searches


def _dominated(p: Point, others: list[Point], maximize: bool) -> bool:
    better = (lambda a, b: a >= b) if maximize else (lambda a, b: a <= b)
    return any(q is not p and q.fits and q.gpus <= p.gpus and better(q.value, p.value)
               and (q.gpus < p.gpus or q.value != p.value) for q in others)


def test_pareto_front_by_hand():
    pts = [Point(0, 8, 100.0, True, ""), Point(1, 8, 150.0, True, ""),  # 1 beats 0
           Point(2, 16, 140.0, True, ""),  # slower than 1 on more GPUs: dominated
           Point(3, 16, 300.0, True, ""), Point(4, 32, 280.0, True, ""),  # 4 dominated by 3
           Point(5, 32, 900.0, False, ""),  # fastest, but does not fit: never on the front
           Point(6, 64, 301.0, True, "")]
    assert [p.plan_id for p in pareto_front(pts, maximize=True)] == [1, 3, 6]
    assert [p.plan_id for p in pareto_front(pts, maximize=False)] == [0]
    for maximize in (True, False):
        front = {p.plan_id for p in pareto_front(pts, maximize)}
        brute = {p.plan_id for p in pts if p.fits and not _dominated(p, pts, maximize)}
        assert front == brute


@pytest.mark.parametrize("kind", ["sweep", "search"])
def test_sweep_charts_are_the_sweep_table(report_dirs, kind):
    figs = _figures((report_dirs[kind] / REPORT_FILE).read_text())
    rows = pq.read_table(report_dirs[kind] / "sweep.parquet").to_pylist()
    sim = [r for r in rows if r["status"] == "simulated"]
    thr = figs["sweep-throughput"]
    fits = {(x, y) for t in thr["data"] if t["name"] == "fits" for x, y in zip(t["x"], t["y"])}
    nofit = {(x, y) for t in thr["data"] if t["name"] == "does not fit"
             for x, y in zip(t["x"], t["y"])}
    assert fits == {(r["world_size"], r["tokens_per_s"]) for r in sim if r["fits"]}
    assert nofit == {(r["world_size"], r["tokens_per_s"]) for r in sim if not r["fits"]}
    pts = [Point(r["plan_id"], r["world_size"], r["tokens_per_s"], r["fits"], "") for r in sim]
    front = [t for t in thr["data"] if t["name"].startswith("Pareto")]
    want = {(p.gpus, p.value) for p in pts if p.fits and not _dominated(p, pts, True)}
    assert {(x, y) for x, y in zip(front[0]["x"], front[0]["y"])} == want
    if kind == "sweep":
        # the fixture's sweep: 2 of the 4 simulated plans fit, 2 plans skipped with a reason
        assert len(fits) == 2 and len(nofit) == 2
        assert sum(r["status"] == "skipped" for r in rows) == 2
        text = (report_dirs[kind] / REPORT_FILE).read_text()
        for r in rows:
            if r["status"] == "skipped":
                assert r["skip_reason"].split(";")[0] in text  # every skip reason is shown
        # cost: the price is set, so the chart is cost per million tokens, from the table
        cost = {(x, y) for t in figs["sweep-cost"]["data"] if t["name"] in ("fits",
                                                                               "does not fit")
                for x, y in zip(t["x"], t["y"])}
        assert cost == {(r["world_size"], r["cost_per_million_tokens"]) for r in sim}
    else:
        assert "search-prior" in figs


def test_open_output_tells_kinds_apart(report_dirs):
    assert isinstance(open_output(report_dirs["run"]), RunDir)
    assert open_output(report_dirs["sweep"]).kind == "sweep"
    assert open_output(report_dirs["search"]).kind == "search"


def test_rebuilt_sweep_page_is_the_written_one(report_dirs, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(report_dirs["sweep"], out)
    before = (out / REPORT_FILE).read_text()
    write_report(out)
    assert (out / REPORT_FILE).read_text() == before


def test_a_sweep_without_a_simulated_plan_still_has_its_page(tmp_path):
    from simdist.sweep import PlanCase, case_row, ranked, write_rows

    cases = [PlanCase(0, {"parallel.tp": 3}, [], skip_reason="parallel.tp: tp=3 must divide 8"),
             PlanCase(1, {"parallel.tp": 5}, [], failed="internal error: boom")]
    write_rows(tmp_path, ranked([case_row(c) for c in cases]), ["parallel.tp"],
               dict(kind="sweep", grid={"parallel.tp": ["3", "5"]}))
    text = write_report(tmp_path).read_text()
    assert _figures(text) == {}  # nothing simulated: no chart, and no broken one
    assert "tp=3 must divide 8" in text and "internal error: boom" in text
