"""Reading an output directory for a report: a run directory (plan.json, ranks / collectives /
memory parquet, timeline.json) or a sweep / search directory (sweep.json, sweep.parquet,
search.json, plans/<n>/). Files only: nothing here imports the simulator. A missing or unreadable
file is a ConfigError naming it (exit 2 in the CLI), never a traceback."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from simdist.config import ConfigError

REPORT_FILE = "report.html"


def _json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(key, f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None


def _parquet(path: Path, key: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise ConfigError(key, f"{path} is missing") from None
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None


@dataclass
class RunDir:
    """A run directory; each file is read when first used."""

    path: Path
    key: str = "DIR"  # the argument named in errors (`simdist report DIR`, compare's RUN_DIR)

    @cached_property
    def plan(self) -> dict[str, Any]:
        return _json(self.path / "plan.json", self.key)

    @cached_property
    def ranks(self) -> list[dict[str, Any]]:
        rows = _parquet(self.path / "ranks.parquet", self.key).to_pylist()
        if not rows:
            raise ConfigError(self.key, f"{self.path}/ranks.parquet has no rows")
        return rows

    @cached_property
    def collectives(self) -> list[dict[str, Any]]:
        p = self.path / "collectives.parquet"
        return _parquet(p, self.key).to_pylist() if p.exists() else []

    @cached_property
    def memory(self) -> pa.Table:
        return _parquet(self.path / "memory.parquet", self.key)

    @cached_property
    def timeline(self) -> dict[str, Any]:
        p = self.path / "timeline.json"
        return _json(p, self.key) if p.exists() else {"traceEvents": []}

    @property
    def memory_limit_bytes(self) -> int | None:
        return self.plan.get("memory_limit_bytes")


@dataclass
class SweepDir:
    """A sweep or search directory."""

    path: Path
    key: str = "DIR"
    marker: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "search" if self.marker.get("kind") == "search" else "sweep"

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        return _parquet(self.path / "sweep.parquet", self.key).to_pylist()

    @cached_property
    def columns(self) -> list[str]:
        return _parquet(self.path / "sweep.parquet", self.key).column_names

    @cached_property
    def search(self) -> dict[str, Any] | None:
        p = self.path / "search.json"
        return _json(p, self.key) if self.kind == "search" or p.exists() else None

    def plan_dir(self, row: dict[str, Any]) -> RunDir | None:
        """The run directory of a simulated row, when it is there."""
        from simdist.rundir import is_run_dir

        if not row.get("run_dir"):
            return None
        p = self.path / row["run_dir"]
        return RunDir(p, self.key) if is_run_dir(p) else None


def open_run(path: str | os.PathLike, key: str = "DIR") -> RunDir:
    from simdist.rundir import is_run_dir

    p = Path(path).expanduser()
    if not p.is_dir() or not is_run_dir(p):
        raise ConfigError(key, f"{p} is not a simdist run directory (no plan.json with "
                               "simdist_version); allowed: directories written by simdist run, "
                               "or a sweep's plans/<n>")
    return RunDir(p, key)


def open_output(path: str | os.PathLike, key: str = "DIR") -> RunDir | SweepDir:
    """A run directory or a sweep / search directory; anything else is a ConfigError."""
    from simdist.rundir import MARKER, is_run_dir, is_sweep_dir

    p = Path(path).expanduser()
    if p.is_dir() and is_run_dir(p):
        return RunDir(p, key)
    if p.is_dir() and is_sweep_dir(p):
        return SweepDir(p, key, _json(p / "sweep.json", key))
    what = "does not exist" if not p.exists() else ("is not a directory" if not p.is_dir() else
                                                    "is not a simdist output directory")
    raise ConfigError(key, f"{p} {what} (no plan.json or sweep.json with {MARKER}); allowed: a "
                           "directory written by simdist run, sweep or search")
