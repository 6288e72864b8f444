"""Tables for dashboards elsewhere (#12 item 7): every Parquet table simdist writes — ranks, ops,
collectives, memory, kernels of a run; sweep.parquet of a sweep and of a search — is read back
by DuckDB, and its columns and their types are exactly the README's "Output tables" (parsed
from the README itself, so the documentation cannot drift from the files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simdist.search import DIMS

duckdb = pytest.importorskip("duckdb")

README = Path(__file__).resolve().parents[1] / "README.md"
# README type names -> DuckDB's names for the Parquet types
DUCK = {"int32": "INTEGER", "int64": "BIGINT", "float64": "DOUBLE", "string": "VARCHAR",
        "bool": "BOOLEAN"}
RUN_TABLES = ("ranks", "ops", "collectives", "memory", "kernels")
SEARCH_ONLY = {"prior_step_time_s", "prior_tokens_per_s", "prior_peak_bytes", "found_by"}


def readme_columns(table: str) -> dict[str, str]:
    """column -> README type, from the '### `<table>.parquet`' section's table (rows whose
    first cell names columns in backticks; '`a`, `b` | int64, int32' pairs them in order)."""
    text = README.read_text(encoding="utf-8")
    head = re.search(rf"^### `{re.escape(table)}\.parquet`.*$", text, re.M)
    assert head, f"README has no section for {table}.parquet"
    body = text[head.end():]
    end = re.search(r"^#{2,3} ", body, re.M)
    body = body[:end.start()] if end else body
    out: dict[str, str] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        if len(types) == 1:
            types *= len(names)
        assert len(types) == len(names), line
        for n, t in zip(names, types):
            assert t in DUCK, f"{table}.{n}: README type {t!r}"
            out[n] = t
    assert out, f"README's {table}.parquet section lists no columns"
    return out


def duck_columns(path: Path) -> dict[str, str]:
    return {name: typ for name, typ, *_ in
            duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}


def _check(path: Path, documented: dict[str, str], keys: dict[str, str]) -> None:
    got = duck_columns(path)
    want = {**{k: DUCK[v] for k, v in documented.items()}, **keys}
    assert got == want, {"undocumented": sorted(set(got) - set(want)),
                         "missing": sorted(set(want) - set(got)),
                         "types": {k: (got[k], want[k]) for k in set(got) & set(want)
                                   if got[k] != want[k]}}
    ((n,),) = duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()
    assert n == pq.read_metadata(path).num_rows > 0


@pytest.mark.parametrize("table", RUN_TABLES)
def test_run_tables_are_the_readme(report_dirs, table):
    _check(report_dirs["run"] / f"{table}.parquet", readme_columns(table), {})


def test_sweep_table_is_the_readme(report_dirs):
    doc = {k: v for k, v in readme_columns("sweep").items() if k not in SEARCH_ONLY}
    grid = json.loads((report_dirs["sweep"] / "sweep.json").read_text())["grid"]
    # the fixture's grid keys are integers: typed as --set types them (int64)
    _check(report_dirs["sweep"] / "sweep.parquet", doc, {k: "BIGINT" for k in grid})


def test_search_table_is_the_readme(report_dirs):
    doc = readme_columns("sweep")
    assert SEARCH_ONLY <= doc.keys()
    readme = README.read_text(encoding="utf-8")
    for k in DIMS:  # the README names every search dimension column
        assert f"`{k}`" in readme, k
    strings = {"parallel.pp_schedule", "training.activation_checkpointing"}
    keys = {k: "VARCHAR" if k in strings else "BIGINT" for k in DIMS}
    _check(report_dirs["search"] / "sweep.parquet", doc, keys)


def test_a_sweep_joins_its_plans_ranks(report_dirs):
    """The README's kind of query: sweep rows joined to every plan's ranks.parquet."""
    d = report_dirs["sweep"]
    got = duckdb.sql(f"""
        SELECT s.plan_id, max(r.peak_bytes), count(*)
        FROM read_parquet('{d}/sweep.parquet') AS s
        JOIN read_parquet('{d}/plans/*/ranks.parquet', filename = true) AS r
          ON r.filename = '{d}/' || s.run_dir || '/ranks.parquet'
        GROUP BY ALL ORDER BY 1""").fetchall()
    rows = sorted((r for r in pq.read_table(d / "sweep.parquet").to_pylist()
                   if r["status"] == "simulated"), key=lambda r: r["plan_id"])
    assert got == [(r["plan_id"], r["peak_bytes_max"], r["world_size"]) for r in rows]
