"""`simdist sweep` and `simdist compare`, and the output tables read back with DuckDB (#12 items
1, 5, 7). One sweep of the quickstart (llama3-debug on 8 GPUs; 6 combinations, 2 invalid) is
simulated in this process and shared by the tests; the CLI tests run the command itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simdist.config import ConfigError
from simdist.sweep import combinations, parse_grid, split_values

from tests.test_cli import QUICKSTART, run_cli

GRID = ["parallel.tp=1,2,3", "training.activation_checkpointing=none,full"]
PRICE = 2.5


# ------------------------------------------------------------------------------------------
# The grid


def test_split_values_keeps_lists_and_mappings_whole():
    assert split_values("1, 2,[24,20], {a: 1, b: 2}") == ["1", "2", "[24,20]", "{a: 1, b: 2}"]


def test_combinations_nest_in_grid_order():
    grid = parse_grid(["parallel.tp=1,2", "training.micro_batch=1,2,4"])
    combos = combinations(grid)
    assert len(combos) == 6
    assert combos[0] == {"parallel.tp": "1", "training.micro_batch": "1"}
    assert combos[1] == {"parallel.tp": "1", "training.micro_batch": "2"}
    assert combos[-1] == {"parallel.tp": "2", "training.micro_batch": "4"}


@pytest.mark.parametrize("texts, words", [
    (["parallel.tp"], ["KEY=V1,V2"]),
    (["parallel.tp="], ["KEY=V1,V2"]),
    (["parallel.tp=1,,2"], ["empty value"]),
    (["parallel.tp=1", "parallel.tp=2"], ["twice"]),
    (["parallel.tp=[1"], ["cannot parse"]),
    (["bad key=1"], ["bad key"]),
    ([], ["at least one"]),
    ([f"training.micro_batch={','.join(map(str, range(1, 101)))}",
      f"training.seq_len={','.join(map(str, range(1, 102)))}"], ["10,100 combinations", "limit"]),
])
def test_bad_grid_is_a_config_error(texts, words):
    with pytest.raises(ConfigError) as e:
        parse_grid(texts)
    assert all(w in str(e.value) for w in words), str(e.value)


# ------------------------------------------------------------------------------------------
# One sweep, simulated in this process in one Ray session


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    from simdist.sweep import run_sweep

    import simdist.workers.pool as pool

    calls, actors = [], []
    real_init, real_start = ray.init, pool.start_workers

    def counting_init(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(kw.get("address"))
        return real_init(*a, **kw)

    def counting_start(n):  # noqa: ANN001, ANN202
        actors.append(n)
        return real_start(n)

    root = tmp_path_factory.mktemp("sweep")
    out = root / "out"
    # a cache of its own: the first sweep executes whatever other tests stored
    sets = [f"cluster.price_per_gpu_hour={PRICE}", f"simulation.cache_dir={root / 'cache'}"]
    ray.init, pool.start_workers = counting_init, counting_start
    try:
        res = run_sweep(str(QUICKSTART), GRID, sets, out, progress=False)
    finally:
        ray.init, pool.start_workers = real_init, real_start
    return res, (calls, actors)


def test_sweep_is_one_ray_session_and_one_set_of_actors(sweep):
    res, (calls, actors), *_ = sweep
    assert calls == ["local"]
    # 4 plans simulated, each wanting up to one actor per CPU: started once, then kept warm
    import os

    assert sum(actors) <= (os.cpu_count() or 1)
    mark = json.loads((res.out / "sweep.json").read_text())
    assert mark["ray"] is True and mark["actors_started"] == sum(actors)


def test_a_warm_sweep_starts_no_ray(tmp_path, monkeypatch):
    """A sweep run again finds every plan in the layer store (6 layers: the layer memo applies;
    the quickstart's 4 execute in full and store nothing): each rebuilds in the driver, so the
    sweep starts neither Ray nor an actor, and its rows are the cold sweep's."""
    import simdist.coordinator as coordinator
    import simdist.workers.pool as pool
    from simdist.sweep import run_sweep

    sets = ["model.n_layers=6", f"simulation.cache_dir={tmp_path / 'cache'}"]
    grid = ["training.micro_batch=1"]  # one plan: what a warm sweep starts, not how many
    cold = run_sweep(str(QUICKSTART), grid, sets, tmp_path / "cold", progress=False)

    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a warm sweep started Ray or an actor")

    monkeypatch.setattr(coordinator, "ray_session", refuse)
    monkeypatch.setattr(pool, "start_workers", refuse)
    shutil.rmtree(tmp_path / "cache" / "plans")  # not the kept plan: the layer store's path
    warm = run_sweep(str(QUICKSTART), grid, sets, tmp_path / "warm", progress=False)
    mark = json.loads((warm.out / "sweep.json").read_text())
    assert (mark["simulated"], mark["ray"], mark["actors_started"]) == (1, False, 0)
    plan = json.loads((warm.out / "plans" / "0" / "plan.json").read_text())
    assert plan["cache"]["plan"] == dict(reused=False, kept=True)
    assert plan["cache"]["layer"]["hits"] == 1
    a = pq.read_table(cold.out / "sweep.parquet").to_pylist()
    b = pq.read_table(warm.out / "sweep.parquet").to_pylist()
    for x, y in zip(a, b, strict=True):
        assert (x["status"], x["fits"]) == (y["status"], y["fits"])
        for k in ("peak_bytes_max", "step_time_s", "tokens_per_s"):
            assert x[k] == pytest.approx(y[k], rel=1e-12), k


def test_a_sweep_run_again_reuses_its_kept_plans(tmp_path, monkeypatch, recwarn):
    """The same plan in a later sweep is copied from the plan store: nothing is planned into a
    simulation, the files are the simulated ones byte for byte, plan.json says so; a plan that
    differs in any config key is simulated; an entry that lost a file is a reported miss."""
    import simdist.coordinator as coordinator
    from simdist.cache.store import CacheWarning
    from simdist.sweep import run_sweep

    sets = [f"simulation.cache_dir={tmp_path / 'cache'}"]
    grid = ["training.micro_batch=1,2"]
    cold = run_sweep(str(QUICKSTART), grid, sets, tmp_path / "cold", progress=False)
    real = coordinator.simulate_async
    simulated = []

    async def counting(run, **kw):  # noqa: ANN001, ANN003, ANN202
        simulated.append(run.cfg.training.micro_batch)
        return await real(run, **kw)

    monkeypatch.setattr(coordinator, "simulate_async", counting)
    warm = run_sweep(str(QUICKSTART), grid, sets, tmp_path / "warm", progress=False)
    assert simulated == []
    for i in (0, 1):
        c, w = cold.out / "plans" / str(i), warm.out / "plans" / str(i)
        for f in ("ranks.parquet", "ops.parquet", "collectives.parquet", "memory.parquet",
                  "kernels.parquet", "timeline.json"):
            assert (c / f).read_bytes() == (w / f).read_bytes(), f
        pc, pw = (json.loads((d / "plan.json").read_text()) for d in (c, w))
        assert pw["cache"]["plan"] == dict(reused=True, kept=True,
                                           simulated_in_s=pc["sim_wall_s"])
        assert pw["execution"]["ray"] is False and pw["execution"]["actors"] == 0
        for k in ("step_time_s", "peak_bytes_max", "tokens_per_s", "fits", "config"):
            assert pw[k] == pc[k], k
    a = pq.read_table(cold.out / "sweep.parquet").to_pylist()
    b = pq.read_table(warm.out / "sweep.parquet").to_pylist()
    for x, y in zip(a, b, strict=True):
        for k in ("status", "fits", "peak_bytes_max", "step_time_s", "tokens_per_s"):
            assert x[k] == y[k], k
    # another value of any key is another plan
    run_sweep(str(QUICKSTART), ["training.micro_batch=1"], [*sets, "training.seq_len=128"],
              tmp_path / "other", progress=False)
    assert simulated == [1]
    # a damaged entry: reported once, removed, simulated again
    from simdist.cache.plans import PlanStore
    import torch

    entries = PlanStore.open(tmp_path / "cache", torch.__version__).entries()
    assert len(entries) == 3
    for e in entries:
        (e / "memory.parquet").unlink()
    again = run_sweep(str(QUICKSTART), ["training.micro_batch=1"], sets, tmp_path / "again",
                      progress=False)
    assert simulated == [1, 1]
    assert any(issubclass(w.category, CacheWarning) and "lacks memory.parquet" in str(w.message)
               for w in recwarn.list)
    assert (again.out / "plans" / "0" / "memory.parquet").is_file()


def test_sweep_parquet_one_row_per_combination(sweep):
    res, *_ = sweep
    t = pq.read_table(res.out / "sweep.parquet")
    assert t.num_rows == 6
    names = t.column_names
    for col in ("parallel.tp", "training.activation_checkpointing", "fits", "peak_bytes_max",
                "peak_rank", "step_time_s", "mfu", "tokens_per_s", "tokens_per_s_per_gpu",
                "cost_per_million_tokens", "skip_reason", "run_dir", "status", "order"):
        assert col in names
    assert str(t.schema.field("parallel.tp").type) == "int64"  # typed as --set types them
    rows = t.to_pylist()
    assert [r["plan_id"] for r in rows] == list(range(6))
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["parallel.tp"] for r in skipped] == [3, 3]
    for r in skipped:  # the config error's own message
        assert r["skip_reason"].startswith("parallel.dp_shard:") and "world size 8" in r["skip_reason"]
        assert r["run_dir"] is None and r["tokens_per_s"] is None
    mark = json.loads((res.out / "sweep.json").read_text())
    assert mark["kind"] == "sweep" and "simdist_version" in mark
    assert (mark["plans"], mark["simulated"], mark["skipped"]) == (6, 4, 2)
    assert (res.out / "report.html").is_file()  # one dashboard for the sweep, none per plan
    assert not list((res.out / "plans").glob("*/report.html"))


def test_sweep_rows_are_their_run_directories(sweep):
    res, *_ = sweep
    for r in pq.read_table(res.out / "sweep.parquet").to_pylist():
        if r["status"] != "simulated":
            continue
        plan = json.loads((res.out / r["run_dir"] / "plan.json").read_text())
        for key in ("fits", "peak_bytes_max", "peak_rank", "step_time_s", "mfu", "tokens_per_s",
                    "tokens_per_s_per_gpu"):
            assert r[key] == plan[key], key
        assert plan["config"]["parallel"]["tp"] == r["parallel.tp"]
        assert (plan["config"]["training"]["activation_checkpointing"]
                == r["training.activation_checkpointing"])
        expected = PRICE * plan["world_size"] / 3600 / plan["tokens_per_s"] * 1e6
        assert r["cost_per_million_tokens"] == pytest.approx(expected)


def test_sweep_ranking(sweep):
    res, *_ = sweep
    rows = res.rows  # ranked
    assert [r["order"] for r in rows] == list(range(1, 7))
    simulated = [r for r in rows if r["status"] == "simulated"]
    assert rows[: len(simulated)] == simulated  # skipped last
    fitting = [r["tokens_per_s"] for r in simulated if r["fits"]]
    assert fitting == sorted(fitting, reverse=True)


# ------------------------------------------------------------------------------------------
# The command line


def test_sweep_cli_progress_table_and_replacing_a_sweep_dir(sweep, tmp_path):
    res, *_ = sweep
    out = tmp_path / "again"
    shutil.copytree(res.out, out)  # a previous sweep directory: replaced whole
    (out / "plans" / "0" / "extra.txt").write_text("old")
    p = run_cli(["sweep", str(QUICKSTART), "--grid", "parallel.tp=1,3", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("simdist sweep: plan")]
    assert len(lines) == 2  # one line per plan when stderr is not a terminal
    assert "skipped: parallel.dp_shard" in lines[0] and "0 done, 1 skipped, 1 left" in lines[0]
    assert "tok/s" in lines[1] and "1 done, 1 skipped, 0 left" in lines[1]
    assert "best tokens/s first" in p.stdout and "plans/0" in p.stdout
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["simulated", "skipped"]
    assert not (out / "plans" / "0" / "extra.txt").exists()
    assert sorted(x.name for x in (out / "plans").iterdir()) == ["0"]


def test_sweep_cli_refuses_a_directory_it_did_not_write(tmp_path):
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    p = run_cli(["sweep", str(QUICKSTART), "--grid", "parallel.tp=1,2", "--out", str(keep)])
    assert p.returncode == 2 and "--out" in p.stderr and "not a simdist run" in p.stderr
    assert (keep / "notes.txt").read_text() == "mine"
    assert "Traceback" not in p.stderr


def test_sweep_cli_bad_grid_exits_2(tmp_path):
    p = run_cli(["sweep", str(QUICKSTART), "--grid", "parallel.tp", "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "--grid" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# compare


def test_compare_two_runs(sweep, tmp_path, capsys):
    from simdist.cli import main

    res, *_ = sweep
    rows = {(r["parallel.tp"], r["training.activation_checkpointing"]): r for r in res.rows}
    a, b = (str(res.out / rows[k]["run_dir"]) for k in ((1, "none"), (2, "full")))
    page = tmp_path / "cmp.html"
    assert main(["compare", a, b, "--html", str(page)]) == 0
    text = capsys.readouterr().out
    for words in ("peak GiB", "class 0: activation", "class 0: exposed_comm", "class 0: bubble",
                  "all_gather / tp", "reduce_scatter / dp_shard", "parallel.tp",
                  "training.activation_checkpointing", "plans/0", "plans/3"):
        assert words in text, words
    assert "training.seq_len" not in text  # only what differs
    doc = page.read_text()
    assert doc.startswith("<!DOCTYPE html>") and "<table>" in doc and "all_gather / tp" in doc
    assert "compare-memory" in doc and "plotly.js v" in doc  # charts, the library embedded
    assert "<script src" not in doc and "<link" not in doc  # self-contained: nothing fetched
    # the same ranks.parquet figures
    ranks = pq.read_table(Path(b) / "ranks.parquet").to_pylist()
    assert f"{max(r['step_s'] for r in ranks):.4f}" in text
    assert main(["compare", a, b, "--html", str(page)]) == 0  # its own file: replaced


def test_compare_bad_input_exits_2(sweep, tmp_path, capsys):
    from simdist.cli import main

    res, *_ = sweep
    run = str(res.out / "plans" / "0")
    assert main(["compare", run, str(tmp_path)]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    foreign = tmp_path / "mine.html"
    foreign.write_text("<html>mine</html>")
    assert main(["compare", run, run, "--html", str(foreign)]) == 2
    assert "--html" in capsys.readouterr().err and foreign.read_text() == "<html>mine</html>"
    assert main(["compare", run]) == 2


# ------------------------------------------------------------------------------------------
# Output tables with DuckDB (the README's query)

README_QUERY = """
SELECT s."parallel.tp" AS tp, s."training.activation_checkpointing" AS ac,
       s.tokens_per_s_per_gpu, max(r.peak_bytes) / 2^30 AS peak_gib, count(*) AS gpus
FROM read_parquet('{dir}/sweep.parquet') AS s
JOIN read_parquet('{dir}/plans/*/ranks.parquet', filename = true) AS r
  ON r.filename = '{dir}/' || s.run_dir || '/ranks.parquet'
WHERE s.fits
GROUP BY ALL
ORDER BY s.tokens_per_s_per_gpu DESC
LIMIT 3
"""


def test_readme_duckdb_query(sweep):
    duckdb = pytest.importorskip("duckdb")
    res, *_ = sweep
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_QUERY.strip().replace("{dir}", "runs/sweep") in readme
    got = duckdb.sql(README_QUERY.format(dir=res.out)).fetchall()
    fit = sorted((r for r in res.rows if r["status"] == "simulated" and r["fits"]),
                 key=lambda r: -r["tokens_per_s_per_gpu"])[:3]
    assert [(g[0], g[1]) for g in got] == [(r["parallel.tp"], r["training.activation_checkpointing"])
                                           for r in fit]
    for g, r in zip(got, fit):
        assert g[2] == pytest.approx(r["tokens_per_s_per_gpu"])
        assert g[3] == pytest.approx(r["peak_bytes_max"] / 2**30)
        assert g[4] == r["world_size"]


# ------------------------------------------------------------------------------------------
# Failures, with the simulation replaced (no Ray)


def test_base_config_must_load_unless_the_grid_sets_the_key(tmp_path):
    from simdist.sweep import run_sweep

    with pytest.raises(ConfigError) as e:  # wrong whatever the grid sets: nothing planned
        run_sweep(str(QUICKSTART), ["parallel.tp=1,2"], ["parallel.tpp=2"], tmp_path / "o",
                  progress=False)
    assert e.value.key == "parallel.tpp" and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError) as e:
        run_sweep(str(tmp_path / "nope.yaml"), ["parallel.tp=1,2"], [], tmp_path / "o",
                  progress=False)
    assert e.value.key == "config" and "not found" in e.value.message


def test_a_base_only_the_grid_makes_valid_is_swept(tmp_path):
    from simdist.sweep import run_sweep

    # tp=3 alone does not divide the 8 GPUs; the grid's tp values replace it (both skipped
    # here as well, for their own reasons, so nothing is simulated)
    res = run_sweep(str(QUICKSTART), ["parallel.tp=5,6"], ["parallel.tp=3"], tmp_path / "o",
                    progress=False)
    assert [r["status"] for r in res.rows] == ["skipped", "skipped"]
    assert "5" in res.rows[0]["skip_reason"] and "6" in res.rows[1]["skip_reason"]


@pytest.fixture
def fake_simulation(monkeypatch):
    """simulate_async replaced: tp=1 fails (internal), tp=2 raises a ConfigError (as from an
    actor), anything else a KeyboardInterrupt when asked to."""
    import contextlib

    import simdist.coordinator as coordinator
    import simdist.sweep

    async def fake(run, **kw):  # noqa: ANN001, ANN003, ANN202
        tp = run.cfg.parallel.tp
        if tp == 1:
            raise RuntimeError("boom")
        if tp == 2:
            raise ConfigError("parallel.tp", "not today")
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator, "simulate_async", fake)
    monkeypatch.setattr(coordinator, "ray_session", lambda *a, **k: contextlib.nullcontext())
    # the plan store off: the session's cache may keep these plans from other tests
    monkeypatch.setattr(simdist.sweep.SimulationSession, "_kept", lambda self, case: (None, None))


def test_a_failing_plan_is_a_row_and_the_sweep_goes_on(fake_simulation, tmp_path):
    from simdist.sweep import run_sweep

    res = run_sweep(str(QUICKSTART), ["parallel.tp=1,2"], [], tmp_path / "out", progress=False)
    rows = {r["parallel.tp"]: r for r in pq.read_table(res.out / "sweep.parquet").to_pylist()}
    assert rows[1]["status"] == "failed" and rows[1]["skip_reason"] == "internal error: RuntimeError: boom"
    assert rows[2]["status"] == "skipped" and rows[2]["skip_reason"] == "parallel.tp: not today"


def test_an_interrupted_sweep_leaves_nothing(fake_simulation, tmp_path):
    from simdist.sweep import run_sweep

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(QUICKSTART), ["parallel.tp=4"], [], out, progress=False)
    assert list(tmp_path.iterdir()) == []
