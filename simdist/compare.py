"""`simdist compare RUN_A RUN_B [...]`: plans side by side from their run directories alone
(plan.json, ranks.parquet, collectives.parquet): the plan's figures, each rank class's peak and
its breakdown, each class's step time and its breakdown, the collectives by kind and mesh
dimension, and the config keys that differ. Printed with rich; `--html PATH` also writes them
as a report page (simdist/report/compare.py: the same tables with side-by-side charts, one
self-contained HTML file). Never imports the simulator."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simdist.config import ConfigError
from simdist.report.compare import COMPARE_GENERATOR, binding_class, per_class
from simdist.report.page import fmt_bytes, write_atomic

GIB = 2**30
MEMORY = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes")
TIME = ("compute_s", "comm_s", "exposed_comm_s", "bubble_s", "step_s")
HTML_MARK = f'<meta name="generator" content="{COMPARE_GENERATOR}">'


@dataclass
class Section:
    title: str
    rows: list[tuple[str, list[str]]] = field(default_factory=list)  # label, one cell per run


@dataclass
class Comparison:
    names: list[str]
    sections: list[Section]
    runs: list[Any] = field(default_factory=list)  # simdist.report.load.RunDir, one per column


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    from simdist.report.load import open_run

    run = open_run(path, "RUN_DIR")
    return dict(path=run.path, plan=run.plan, ranks=run.ranks, collectives=run.collectives,
                run=run)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _gib(b: Any) -> str:
    if b is None:
        return ""
    g = b / GIB
    return f"{g:.2f}" if g >= 1 or g == 0 else f"{g:.3g}"


def _num(x: Any, fmt: str = "{:.4g}") -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, float)):
        return fmt.format(x)
    return str(x)


def compare(paths: list[str | os.PathLike]) -> Comparison:
    runs = [load_run(p) for p in paths]
    names = [str(r["path"]) for r in runs]
    secs = []

    s = Section("plan")
    spec = [("world_size", "world size", _num), ("fits", "fits", _num),
            ("peak_bytes_max", "peak GiB (max over ranks)", _gib), ("peak_rank", "peak rank", _num),
            ("step_time_s", "step time s", lambda x: _num(x, "{:.4f}")),
            ("mfu", "MFU %", lambda x: "" if x is None else f"{100 * x:.2f}"),
            ("tokens_per_s", "tokens/s", lambda x: _num(x, "{:,.0f}")),
            ("tokens_per_s_per_gpu", "tokens/s/GPU", lambda x: _num(x, "{:,.1f}")),
            ("rank_classes", "rank classes", _num), ("num_params", "parameters", _num),
            ("gpu", "GPU", _num)]
    for key, label, fmt in spec:
        s.rows.append((label, [fmt(r["plan"].get(key)) for r in runs]))
    secs.append(s)

    classes = [per_class(r["ranks"]) for r in runs]
    ids = sorted({c for cl in classes for c in cl})
    s = Section("memory per rank class, GiB (the class's highest-peak rank)")
    for cid in ids:
        s.rows.append((f"class {cid}: ranks", [str(cl[cid]["ranks"]) if cid in cl else ""
                                               for cl in classes]))
        for m in MEMORY:
            s.rows.append((f"class {cid}: {m.removesuffix('_bytes')}",
                           [_gib(cl[cid]["mem"][m]) if cid in cl else "" for cl in classes]))
    secs.append(s)

    s = Section("step time per rank class, s (the class's slowest rank)")
    for cid in ids:
        for t in TIME:
            s.rows.append((f"class {cid}: {t.removesuffix('_s')}",
                           [f"{cl[cid]['time'][t]:.4f}" if cid in cl else "" for cl in classes]))
    secs.append(s)

    s = Section("collectives of the slowest rank's class, by kind and mesh dim: count / bytes")
    agg: list[dict[tuple[str, str], list[float]]] = []
    for r in runs:
        cid = binding_class(r["ranks"])
        a: dict[tuple[str, str], list[float]] = {}
        for c in r["collectives"]:
            if c["class_id"] != cid:
                continue
            v = a.setdefault((c["kind"], c["mesh_dim"]), [0, 0])
            v[0] += c["count"]
            v[1] += c["bytes"] * c["count"]
        agg.append(a)
    for key in sorted({k for a in agg for k in a}):
        s.rows.append((f"{key[0]} / {key[1]}",
                       [f"{int(a[key][0]):,} / {fmt_bytes(a[key][1])}" if key in a else ""
                        for a in agg]))
    if not s.rows:
        s.rows.append(("(no collectives)", [""] * len(runs)))
    secs.append(s)

    s = Section("config: keys that differ")
    flat = [flatten(r["plan"].get("config") or {}) for r in runs]
    for key in sorted({k for f in flat for k in f}):
        vals = [f.get(key, "<absent>") for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            s.rows.append((key, [v if isinstance(v, str) else json.dumps(v, default=str)
                                 for v in vals]))
    if not s.rows:
        s.rows.append(("(identical configs)", [""] * len(runs)))
    secs.append(s)
    return Comparison(names, secs, [r["run"] for r in runs])


def short_names(names: list[str]) -> list[str]:
    """Column headers: the paths without their common prefix."""
    parts = [Path(n).parts for n in names]
    common = 0
    while all(len(p) > common + 2 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [str(Path(*p[common:])) for p in parts]


def print_comparison(cmp: Comparison, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    heads = short_names(cmp.names)
    for sec in cmp.sections:
        t = Table(title=sec.title, title_justify="left")
        t.add_column("")
        for h in heads:
            t.add_column(h, justify="right")
        for label, cells in sec.rows:
            t.add_row(label, *cells)
        console.print(t)


def to_html(cmp: Comparison) -> str:
    """The comparison as a report page (simdist.report.compare): charts, then these tables."""
    from simdist.report.compare import compare_page

    return compare_page(short_names(cmp.names), cmp.runs, cmp.sections).html()


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Atomically; an existing file is replaced only if `simdist compare` wrote it."""
    p = Path(path).expanduser().resolve()
    if p.exists():
        if p.is_dir():
            raise ConfigError("--html", f"{p} is a directory; expected a file path")
        try:
            head = p.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError as e:
            raise ConfigError("--html", f"cannot read {p}: {e.strerror or e}") from None
        if HTML_MARK not in head:
            raise ConfigError("--html", f"{p} exists and was not written by simdist compare; it "
                                        "is left as it is; allowed: a new path or a previous "
                                        "simdist compare file")
    if not p.parent.is_dir():
        raise ConfigError("--html", f"cannot write {p}: {p.parent} is not a directory")
    try:
        write_atomic(p, text)
    except OSError as e:
        raise ConfigError("--html", f"cannot write {p}: {e.strerror or e}") from None
    return p


def compare_command(paths: list[str], html_path: str | None) -> int:
    if len(paths) < 2:
        raise ConfigError("RUN_DIR", f"compare needs two or more run directories, got {len(paths)}")
    cmp = compare(paths)
    print_comparison(cmp)
    if html_path:
        print(f"wrote {write_html(html_path, to_html(cmp))}")
    return 0
