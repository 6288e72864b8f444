"""`simdist sweep`: every combination of a grid of config values, planned first (an invalid one is
a row with the config error as its reason), then simulated in one Ray session, written as one
directory: `sweep.parquet` (one row per plan), `sweep.json` (what was swept; the marker that
lets `--out` replace it) and `plans/<n>/` (each plan's run directory, ClusterPlan.write).

The same machinery (PlanCase, simulate_cases, write_sweep_dir) serves `simdist search`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from simdist.config import ConfigError, SimdistConfig, load_config, parse_override

GRID_MAX = 10_000  # combinations of one sweep (each is a simulation)
SWEEP_FILE, MARK_FILE, PLANS_DIR = "sweep.parquet", "sweep.json", "plans"

# Columns of sweep.parquet after the grid keys' own (README "Output tables").
METRIC_COLUMNS = [
    ("plan_id", pa.int32()), ("order", pa.int32()), ("status", pa.string()),
    ("world_size", pa.int32()), ("fits", pa.bool_()), ("peak_bytes_max", pa.int64()),
    ("peak_rank", pa.int32()), ("step_time_s", pa.float64()), ("mfu", pa.float64()),
    ("tokens_per_s", pa.float64()), ("tokens_per_s_per_gpu", pa.float64()),
    ("cost_per_million_tokens", pa.float64()), ("rank_classes", pa.int32()),
    ("sim_wall_s", pa.float64()), ("skip_reason", pa.string()), ("run_dir", pa.string()),
]
METRICS = [name for name, _ in METRIC_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Grid


def split_values(text: str) -> list[str]:
    """'1,2,[24,20],{a: 1, b: 2}' -> ['1', '2', '[24,20]', '{a: 1, b: 2}']: commas inside
    brackets or braces belong to the value (lists and mappings parse as YAML, like --set)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(texts: Iterable[str]) -> dict[str, list[str]]:
    """['parallel.tp=1,2,4', ...] -> {'parallel.tp': ['1', '2', '4'], ...} (value texts, typed
    later by --set's own rule). Each key once; each value list non-empty."""
    grid: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError("--grid", f"expected KEY=V1,V2,... (e.g. parallel.tp=1,2,4), "
                                        f"got {text!r}")
        parse_override(f"{key}=1")  # the key's form, as --set checks it
        if key in grid:
            raise ConfigError("--grid", f"{key} is given twice; give each key once with all "
                                        "its values")
        vals = split_values(values)
        if any(not v for v in vals):
            raise ConfigError("--grid", f"empty value in {text!r}; expected KEY=V1,V2,...")
        for v in vals:
            parse_override(f"{key}={v}")  # a value that is not YAML fails here, naming it
        grid[key] = list(dict.fromkeys(vals))
    if not grid:
        raise ConfigError("--grid", "at least one --grid KEY=V1,V2,... is needed")
    n = math.prod(len(v) for v in grid.values())
    if n > GRID_MAX:
        raise ConfigError("--grid", f"{n:,} combinations; the limit is {GRID_MAX:,} (each is a "
                                    "simulation); narrow the grid or use simdist search")
    return grid


def combinations(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, the last key varying fastest (as nested loops in grid order)."""
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def typed(key: str, text: str) -> Any:
    return parse_override(f"{key}={text}")[1]


# ---------------------------------------------------------------------------------------------
# One plan of a sweep or search


@dataclass
class PlanCase:
    """One plan: its key values, the full override list, and (once planned) its config and
    RunPlan, or why it is skipped."""

    plan_id: int
    values: dict[str, Any]  # column -> value (grid keys; search: its dimensions)
    overrides: list[str]
    cfg: SimdistConfig | None = None
    run: Any = None  # simdist.planner.RunPlan
    skip_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more columns (search: the prior)
    summary: dict[str, Any] | None = None
    run_dir: str | None = None
    failed: str | None = None  # an internal error while simulating it

    @property
    def label(self) -> str:
        return " ".join(f"{k.rsplit('.', 1)[-1]}={_text(v)}" for k, v in self.values.items())


def plan_case(config: str | Path | dict, case: PlanCase, *, trust_code: bool = False,
              use_cache: bool = True) -> PlanCase:
    """Load and plan `case` (pure, no Ray); a ConfigError becomes its skip reason."""
    from simdist.planner import plan_run

    from simdist.errors import one_line

    try:
        case.cfg = load_config(config, case.overrides, trust_code=trust_code)
        case.run = plan_run(case.cfg, use_cache=use_cache)
    except ConfigError as e:
        case.cfg, case.run, case.skip_reason = None, None, str(e)
    except Exception as e:  # noqa: BLE001 - the planner's own failure is this plan's row
        case.run, case.failed = None, f"internal error: {one_line(e)}"
    return case


def base_error(config: str | Path | dict, overrides: list[str], *,
               trust_code: bool = False) -> ConfigError | None:
    """The config with --set alone: its ConfigError, if any."""
    try:
        load_config(config, overrides, trust_code=trust_code)
    except ConfigError as e:
        return e
    return None


def check_base(error: ConfigError | None, cases: list[PlanCase]) -> None:
    """A config or --set that is wrong whatever the grid sets (a missing file, bad YAML, an
    unknown key: every plan skipped with the base config's own error) is exit 2, not a sweep of
    skipped plans. A base that only the grid's values make valid (tp=3 in the file, the grid
    sets tp) is fine."""
    if error is not None and cases and all(c.skip_reason == str(error) for c in cases):
        raise error


def cost_per_million_tokens(cfg: SimdistConfig | None, summary: dict) -> float | None:
    """price_per_gpu_hour x world / 3600 / tokens_per_s x 1e6 (null without a price)."""
    price = cfg.cluster.price_per_gpu_hour if cfg is not None else None
    tps = summary.get("tokens_per_s")
    if price is None or not tps:
        return None
    return price * summary["world_size"] / 3600.0 / tps * 1e6


def case_row(case: PlanCase) -> dict[str, Any]:
    s = case.summary or {}
    status = "failed" if case.failed else "skipped" if case.skip_reason else (
        "simulated" if case.summary is not None else "pending")
    row = dict(case.values)
    row.update(
        plan_id=case.plan_id, order=None, status=status,
        world_size=s.get("world_size", case.cfg.world_size if case.cfg is not None else None),
        fits=s.get("fits"), peak_bytes_max=s.get("peak_bytes_max"), peak_rank=s.get("peak_rank"),
        step_time_s=s.get("step_time_s"), mfu=s.get("mfu"), tokens_per_s=s.get("tokens_per_s"),
        tokens_per_s_per_gpu=s.get("tokens_per_s_per_gpu"),
        cost_per_million_tokens=cost_per_million_tokens(case.cfg, s) if s else None,
        rank_classes=s.get("rank_classes"), sim_wall_s=s.get("sim_wall_s"),
        skip_reason=case.failed or case.skip_reason, run_dir=case.run_dir,
    )
    row.update(case.extra)
    return row


def rank_key(row: dict) -> tuple:
    """Best first: simulated plans that fit by tokens/s (highest first), then simulated plans
    that do not fit (by tokens/s), then skipped and failed plans (in plan order)."""
    if row["status"] != "simulated":
        return (2, row["plan_id"])
    return (0 if row["fits"] else 1, -(row["tokens_per_s"] or 0.0), row["plan_id"])


def ranked(rows: list[dict], key: Callable[[dict], tuple] = rank_key) -> list[dict]:
    out = sorted(rows, key=key)
    for i, r in enumerate(out, 1):
        r["order"] = i
    return out


# ---------------------------------------------------------------------------------------------
# Simulation: one Ray session for every plan


class SweepProgress:
    """Plans done / skipped / left: a rich bar on a terminal, a line per plan otherwise."""

    def __init__(self, total: int, skipped: int, enabled: bool, what: str = "sweep") -> None:
        self.total, self.done, self.skipped, self.what = total, 0, skipped, what
        self.enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task(self._text(), total=total,
                                            completed=skipped)
            self._bar.start()

    def _text(self) -> str:
        left = self.total - self.done - self.skipped
        return f"{self.what}: {self.done} done, {self.skipped} skipped, {left} left"

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(f"simdist {self.what}: {text}", file=sys.stderr, flush=True)

    def finished(self, case: PlanCase) -> None:
        if case.summary is not None:
            self.done += 1
            s = case.summary
            what = (f"{s['tokens_per_s']:,.0f} tok/s, peak {s['peak_bytes_max'] / 2**30:.2f} GiB, "
                    f"fits {str(s['fits']).lower()}")
        else:
            self.skipped += 1
            what = f"skipped: {case.failed or case.skip_reason}"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.skipped,
                             description=self._text())
        left = self.total - self.done - self.skipped
        self.line(f"plan {case.plan_id} [{case.label}] {what} ({self.done} done, "
                  f"{self.skipped} skipped, {left} left)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class SimulationSession:
    """One Ray session and one set of rank actors (coordinator.SharedWorkers: Ray starts only
    if some plan has something to execute, actors stay warm from plan to plan; the cache dir
    is shared by all) for plans simulated in one or more batches (a sweep: one batch; a
    search: a batch per step, each chosen from what the previous ones gave). Each planned case
    (`case.run` set) is simulated, at most `concurrency` at once, and written to
    plans_dir/<plan_id>. A ConfigError raised while simulating skips the case; any other error
    marks it failed and the rest go on."""

    def __init__(self, plans_dir: Path, *, address: str | None = None,
                 workers: int | str | None = None, use_cache: bool = True,
                 concurrency: int = 1, progress: SweepProgress | None = None,
                 on_done: Callable[[PlanCase], None] | None = None) -> None:
        from simdist.coordinator import SharedWorkers

        self.plans_dir, self.address, self.workers = plans_dir, address, workers
        self.use_cache, self.progress, self.on_done = use_cache, progress, on_done
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self._shared = SharedWorkers(address)

    async def _one(self, case: PlanCase) -> None:
        from simdist.coordinator import simulate_async
        from simdist.errors import one_line, root_cause

        async with self._sem:
            out = self.plans_dir / str(case.plan_id)
            store, key = self._kept(case)
            t0 = time.perf_counter()
            if key is not None and (summary := store.restore(key, out)) is not None:
                case.summary = reused_summary(summary, time.perf_counter() - t0)
                (out / "plan.json").write_text(
                    json.dumps(case.summary, indent=2, default=str) + "\n")
                case.run_dir = f"{PLANS_DIR}/{case.plan_id}"
            else:
                try:
                    plan = await simulate_async(case.run, workers=self.workers,
                                                use_cache=self.use_cache, address=self.address,
                                                shared=self._shared)
                except Exception as e:  # noqa: BLE001 - one plan's failure is that plan's row
                    cause, _ = root_cause(e)
                    if isinstance(cause, ConfigError):
                        case.skip_reason = str(cause)
                    else:
                        case.failed = f"internal error: {one_line(e)}"
                else:
                    plan.summary.setdefault("cache", {})["plan"] = dict(reused=False,
                                                                        kept=key is not None)
                    case.summary = plan.summary
                    plan.write(out, report=False)  # the sweep's own page covers its plans
                    case.run_dir = f"{PLANS_DIR}/{case.plan_id}"
                    if key is not None:
                        store.put(key, out)
            if self.progress is not None:
                self.progress.finished(case)
            if self.on_done is not None:
                self.on_done(case)

    def _kept(self, case: PlanCase) -> tuple[Any, str | None]:
        """The plan store and `case`'s key in it (None: not kept: --no-cache, user code)."""
        if not self.use_cache:
            return None, None
        import torch

        from simdist.cache.plans import PlanStore, plan_key

        key = plan_key(case.cfg.to_dict(), case.run.exhaustive)
        if key is None:
            return None, None
        return PlanStore.open(case.cfg.simulation.cache_dir, torch.__version__), key

    async def simulate(self, cases: list[PlanCase]) -> None:
        await asyncio.gather(*(self._one(c) for c in cases if c.run is not None))

    def close(self) -> dict[str, Any]:
        """Stop the actors; what the session started: {ray: bool, actors_started: int}."""
        started = dict(ray=self._shared.ray_started, actors_started=self._shared.started)
        self._shared.close()
        return started


def reused_summary(summary: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """A kept plan's plan.json as this sweep's: its figures unchanged, `sim_wall_s` this copy's,
    `cache.plan` saying it was reused (and how long its simulation took), nothing executed."""
    out = dict(summary)
    cache_ = dict(out.get("cache") or {})
    cache_["plan"] = dict(reused=True, kept=True, simulated_in_s=summary.get("sim_wall_s"))
    out["cache"] = cache_
    out["execution"] = {**(out.get("execution") or {}), "ray": False, "ray_address": None,
                        "actors": 0}
    out["sim_wall_s"] = wall_s
    return out


async def simulate_cases(cases: list[PlanCase], plans_dir: Path, *, address: str | None = None,
                         workers: int | str | None = None, use_cache: bool = True,
                         concurrency: int = 1, progress: SweepProgress | None = None,
                         on_done: Callable[[PlanCase], None] | None = None) -> dict[str, Any]:
    """Simulate every planned case in one SimulationSession; returns what it started."""
    session = SimulationSession(plans_dir, address=address, workers=workers,
                                use_cache=use_cache, concurrency=concurrency, progress=progress,
                                on_done=on_done)
    try:
        await session.simulate(cases)
    finally:
        started = session.close()
    return started


# ---------------------------------------------------------------------------------------------
# The directory


def sweep_table(rows: list[dict], keys: list[str]) -> pa.Table:
    """One row per plan: the key columns (typed where every value has one type, else strings),
    then METRIC_COLUMNS, then any extra columns (float)."""
    cols: dict[str, pa.Array] = {}
    for k in keys:
        cols[k] = _column([r.get(k) for r in rows])
    for name, typ in METRIC_COLUMNS:
        cols[name] = pa.array([r.get(name) for r in rows], typ)
    extra = [k for r in rows for k in r if k not in cols]
    for k in dict.fromkeys(extra):
        cols[k] = _column([r.get(k) for r in rows])
    return pa.table(cols)


def _column(values: list[Any]) -> pa.Array:
    present = [v for v in values if v is not None]
    types = {type(v) for v in present}
    if types <= {bool} or types <= {str}:
        return pa.array(values)
    if types <= {int}:
        return pa.array(values, pa.int64())
    if types <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else _text(v) for v in values], pa.string())


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), default=str)


def write_rows(tmp: Path, rows: list[dict], keys: list[str], marker: dict[str, Any]) -> None:
    import simdist

    pq.write_table(sweep_table(rows, keys), tmp / SWEEP_FILE)
    mark = {"simdist_version": simdist.__version__, **marker}
    (tmp / MARK_FILE).write_text(json.dumps(mark, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# Printing


def print_ranked(rows: list[dict], keys: list[str], *, title: str, console: Any = None,
                 limit: int | None = None) -> None:
    """The ranked table (rows already in order), with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    price = any(r.get("cost_per_million_tokens") is not None for r in rows)
    t = Table(title=title, title_justify="left")
    t.add_column("#", justify="right")
    for k in keys:
        t.add_column(k.rsplit(".", 1)[-1] if k.count(".") else k, justify="right")
    for name in ("fits", "peak GiB", "step s", "MFU %", "tok/s", "tok/s/GPU"):
        t.add_column(name, justify="right")
    if price:
        t.add_column("$/M tok", justify="right")
    t.add_column("note")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        cells = [str(r["order"])] + [_text(r.get(k)) for k in keys]
        if r["status"] == "simulated":
            cells += [str(r["fits"]).lower(), f"{r['peak_bytes_max'] / 2**30:.2f}",
                      f"{r['step_time_s']:.3f}", f"{100 * r['mfu']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_gpu']:,.0f}"]
            if price:
                c = r.get("cost_per_million_tokens")
                cells.append("" if c is None else f"{c:.2f}")
            cells.append(r.get("run_dir") or "")
        else:
            cells += [""] * (6 + price) + [f"{r['status']}: {r.get('skip_reason') or ''}"]
        t.add_row(*cells)
    console.print(t)
    if limit is not None and len(rows) > limit:
        console.print(f"... and {len(rows) - limit} more (sweep.parquet has every plan)")


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # ranked
    keys: list[str]


def run_sweep(config: str | Path | dict, grid_texts: list[str], overrides: list[str], out: Path,
              *, address: str | None = None, workers: int | str | None = None,
              use_cache: bool = True, trust_code: bool = False, concurrency: int = 1,
              progress: bool = True, limit: int | None = None) -> SweepResult:
    """Plan every combination (the first `limit` only, when given), simulate the valid ones in
    one Ray session, write `out` (already checked by rundir.check_out) atomically: built beside
    it, renamed at the end."""
    from simdist.rundir import install, staging_dir

    t0 = time.perf_counter()
    grid = parse_grid(grid_texts)
    keys = list(grid)
    error = base_error(config, overrides, trust_code=trust_code)
    cases = []
    for i, combo in enumerate(combinations(grid)[:limit]):
        case = PlanCase(i, {k: typed(k, v) for k, v in combo.items()},
                        [*overrides, *(f"{k}={v}" for k, v in combo.items())])
        cases.append(plan_case(config, case, trust_code=trust_code, use_cache=use_cache))
    check_base(error, cases)
    bar = SweepProgress(len(cases), 0, progress)
    for c in cases:
        if c.run is None:
            bar.finished(c)
    tmp = staging_dir(out)
    try:
        plans_dir = tmp / PLANS_DIR
        plans_dir.mkdir()
        session = dict(ray=False, actors_started=0)
        if any(c.run is not None for c in cases):
            session = asyncio.run(simulate_cases(cases, plans_dir, address=address,
                                                 workers=workers, use_cache=use_cache,
                                                 concurrency=concurrency, progress=bar))
        bar.close()
        rows = ranked([case_row(c) for c in cases])
        write_rows(tmp, sorted(rows, key=lambda r: r["plan_id"]), keys, dict(
            kind="sweep", config=str(config) if not isinstance(config, dict) else None,
            overrides=list(overrides), grid=grid, plans=len(cases),
            simulated=sum(r["status"] == "simulated" for r in rows),
            skipped=sum(r["status"] == "skipped" for r in rows),
            failed=sum(r["status"] == "failed" for r in rows), **session,
            wall_s=time.perf_counter() - t0))
        from simdist.report import write_report_or_warn

        write_report_or_warn(tmp)
        install(tmp, out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SweepResult(out, rows, keys)
