"""Bodies of `simdist cache info | clear | path` (wired by cli.py). No torch import: the torch
version comes from the installed distribution's metadata."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from simdist.cache import schema as S
from simdist.cache.store import _NAME, CacheStore, resolve_dir

EXIT_OK, EXIT_INPUT = 0, 2
ACTIONS = ("info", "clear", "path")


def _torch_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001 - torch not installed: info still lists the files
        return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _scan(d: Path) -> dict:
    """Read-only look at one version directory (nothing is quarantined or rewritten here)."""
    out = dict(files=0, bytes=0, entries=0, cost_rows=0, torch=None, schema=None, unreadable=0,
               valid=0, bypass=0)
    for p in sorted(d.iterdir()):
        m = _NAME.match(p.name)
        if not m:
            continue
        out["files"] += 1
        out["bytes"] += p.stat().st_size
        try:
            with pa.memory_map(str(p)) as f:
                table = pa.ipc.open_file(f).read_all()
        except (pa.ArrowException, OSError):
            out["unreadable"] += 1
            continue
        kind, sver, tver = S.table_versions(table.schema)
        out["torch"], out["schema"] = out["torch"] or tver, out["schema"] or sver
        if kind == "entries":
            out["entries"] += table.num_rows
            kinds = table["kind"].to_pylist() if "kind" in table.column_names else []
            out["valid"] += kinds.count("valid")
            out["bypass"] += kinds.count("bypass")
        elif kind == "costs":
            out["cost_rows"] += table.num_rows
    return out


def info(cache_dir: str | None) -> int:
    root = resolve_dir(cache_dir)
    current = _torch_version()
    print(f"cache dir: {root}")
    print(f"this install: torch {current or '(not installed)'}, cache schema {S.SCHEMA_VERSION}")
    base = root / "dispatch"
    dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not dirs:
        print("dispatch cache: empty")
    for d in dirs:
        s = _scan(d)
        mine = current is not None and d.name == CacheStore(root, current).dir.name
        print(f"{d.name}{'  (this install)' if mine else ''}")
        print(f"  files {s['files']}, {_human(s['bytes'])} ({s['bytes']} bytes)")
        print(f"  entries {s['entries']} ({s['valid']} valid, {s['bypass']} bypass; rows before "
              f"dedup), cost rows {s['cost_rows']}")
        print(f"  torch {s['torch'] or '?'}, schema {s['schema'] or '?'}"
              + (f", {s['unreadable']} unreadable file(s)" if s["unreadable"] else ""))
    _layer_info(root, current)
    _plan_info(root, current)
    q = root / "quarantine"
    if q.is_dir():
        n = sum(1 for p in q.iterdir() if p.is_file())
        if n:
            print(f"quarantine: {n} file(s) set aside as corrupt or foreign ({q})")
    return EXIT_OK


def _version_dirs(base: Path, what: str, mine: str | None) -> Iterator[Path]:
    """A store's format / torch-version directories, each after its heading line."""
    dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not dirs:
        print(f"{what}: empty")
    for d in dirs:
        print(f"{what} {d.name}{'  (this install)' if d.name == mine else ''}")
        yield d


def _layer_info(root: Path, current: str | None) -> None:
    """The layer store (cache/layers.py)."""
    from simdist.cache.layers import LayerStore

    mine = LayerStore(root, current, 0).dir.name if current else None
    for d in _version_dirs(root / "layers", "layer store", mine):
        files = [p for p in d.glob("*.arrow") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
        rebuilt = sum(p.name.endswith(".rebuilt.arrow") for p in files)
        print(f"  entries {len(files) - rebuilt} (layer-memo models) + {rebuilt} (rebuilt "
              f"ranks), {_human(nbytes)} ({nbytes} bytes)")


def _plan_info(root: Path, current: str | None) -> None:
    """The plan store (cache/plans.py)."""
    from simdist.cache.plans import PlanStore

    mine = PlanStore(root, current, 0).dir.name if current else None
    for d in _version_dirs(root / "plans", "plan store", mine):
        n, nbytes = PlanStore(root, d.name.rsplit("-torch-", 1)[-1], 0).usage()
        print(f"  entries {n} (simulated plans of sweeps and searches), {_human(nbytes)} "
              f"({nbytes} bytes)")


def clear(cache_dir: str | None) -> int:
    root = resolve_dir(cache_dir)
    n = CacheStore(root, _torch_version() or "unknown").clear()
    for sub in ("layers", "plans"):
        d = root / sub
        if d.is_dir():
            n += sum(1 for p in d.rglob("*") if p.is_file())
            shutil.rmtree(d, ignore_errors=True)
    print(f"removed {n} file(s) from {root} (dispatch cache, layer store and plan store, every "
          "torch version, and quarantine)")
    return EXIT_OK


def _unusable(root: Path) -> str | None:
    """A cache_dir that is a file (or under one): one line instead of a traceback."""
    place = root
    while not place.exists() and place != place.parent:
        place = place.parent
    if place.is_dir():
        return None
    return f"{root} is {'a file' if place == root else f'under {place}, a file'}, not a directory"


def cache_command(action: str, cache_dir: str | None) -> int:
    """`simdist cache info|clear|path`: print, return the exit code (2 for an unknown action)."""
    if action == "path":
        print(resolve_dir(cache_dir))
        return EXIT_OK
    if action in ("info", "clear"):
        problem = _unusable(resolve_dir(cache_dir))
        if problem is not None:
            print(f"simdist: invalid input: --cache-dir: {problem}", file=sys.stderr)
            return EXIT_INPUT
    if action == "info":
        return info(cache_dir)
    if action == "clear":
        return clear(cache_dir)
    print(f"simdist: invalid input: cache action {action!r}; allowed: {', '.join(ACTIONS)}",
          file=sys.stderr)
    return EXIT_INPUT
