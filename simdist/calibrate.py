"""`simdist calibrate`: measure this machine's GPU (and NCCL between its GPUs) and write a
calibration table that ``cluster.calibration: PATH`` puts over the defaults.

Three parts, kept apart so that all but the first run on any CPU:

* measurement (torch.cuda events, warm-up, repeats; CUDA only): ``measure`` times bf16
  ``aten.mm`` over a grid of shapes, flash attention forward and backward
  (``aten._scaled_dot_product_flash_attention[_backward]``, the ops simdist's models record),
  large ``clone`` / ``add`` for HBM bandwidth, a 1-element ``add`` for the launch floor, and,
  with several local GPUs, all_reduce / all_gather / reduce_scatter by message size through
  torch.distributed + NCCL (torch.multiprocessing, one process per GPU, once with NCCL's own
  algorithm choice and once with ``NCCL_ALGO=Ring``). Each kernel row describes its op as the
  op recorder does (``describe``: name, input shapes, torch's FLOP formula, bytes in and out),
  so the fitted constants mean what the time model means by them.
* conversion (``simdist.costmodel.fit``): the kernel and collective models run backwards.
* the command (``calibrate_command``): checks, measure, fit, write the table
  (``Calibration.write``, rows for one GPU preset only) and a JSON sidecar of the raw
  measurements, the fitted values, the defaults and the model's error on every measured row.

``calibration_for(cfg)`` is the table a run uses: ``cluster.calibration`` loaded over the
defaults, or the defaults. This module imports torch only inside the measuring functions, and
never pydantic or Ray (the GPU images have neither).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from simdist.costmodel.calibration import Calibration, _read, default_calibration, load_calibration

__all__ = ["NO_GPU_MESSAGE", "calibrate_command", "calibration_for", "check_calibration_file",
           "collective_sizes", "describe", "detect_preset", "kernel_cases", "measure"]

NO_GPU_MESSAGE = "simdist calibrate needs a CUDA GPU; none found"
EXIT_OK, EXIT_INPUT = 0, 2


# ------------------------------------------------------------------ the table a run uses


def calibration_for(cfg: Any) -> Calibration:
    """``cfg.cluster.calibration`` loaded over the defaults (cached per file and mtime), or
    ``default_calibration()`` when it is null."""
    path = getattr(cfg.cluster, "calibration", None)
    if path is None:
        return default_calibration()
    p = os.fspath(Path(path).expanduser())
    return _load(p, os.stat(p).st_mtime_ns)


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> Calibration:  # noqa: ARG001 - the cache key
    return load_calibration(path)


def check_calibration_file(path: str | os.PathLike, gpu: str) -> Path:
    """The absolute path of a calibration table usable for GPU preset ``gpu``; ValueError
    saying what is wrong otherwise (missing, unreadable, bad rows, no rows for ``gpu``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p} is not a file")
    load_calibration(p)  # unreadable files, unknown keys, bad values: ValueError naming them
    own = Calibration.from_table(_read(p))
    gpus = sorted({g for g, _ in own.values})
    if not gpus:
        raise ValueError(f"{p} has no rows")
    if gpu not in gpus and "*" not in gpus:
        raise ValueError(f"{p} has rows for GPU {', '.join(gpus)} only, so it changes nothing "
                         f"for cluster.gpu {gpu!r}; calibrate on that GPU (simdist calibrate "
                         f"--gpu {gpu}) or set cluster.calibration: null")
    return p.resolve()


# ------------------------------------------------------------------ GPU presets


def detect_preset(device_name: str) -> str | None:
    """The hardware preset of a torch.cuda device name, None where no preset matches (a PCIe
    or NVL card, a Grace superchip: other clocks, power or memory than the SXM presets)."""
    n = device_name.lower().replace(" ", "-")
    if any(s in n for s in ("pcie", "nvl", "gh200", "gb200")):
        return None
    if "h200" in n:
        return "h200"
    if "h100" in n and ("sxm" in n or "hbm3" in n):
        return "h100-sxm"
    if "b200" in n:
        return "b200"
    if "a100" in n and "80gb" in n:
        return "a100-80gb"
    if "a100" in n and "40gb" in n:
        return "a100-40gb"
    if "v100" in n and "32gb" in n:
        return "v100-32gb"
    if "mi300x" in n:
        return "mi300x"
    return None


# ------------------------------------------------------------------ what is measured


def kernel_cases(quick: bool, sms: int, tile: tuple[int, int]) -> list[tuple[str, str, tuple]]:
    """(role, kind, parameters) of every kernel measurement (see simdist.costmodel.fit for the
    roles). GEMM ``tile`` shapes sit on a whole wave of output tiles over ``sms`` SMs and half a
    tile above and below it, where the model's quantisation steps."""
    tm, tn = tile
    cases: list[tuple[str, str, tuple]] = []
    squares = (4096, 8192) if quick else (4096, 6144, 8192, 12288, 16384)
    cases += [("ceiling", "gemm", (s, s, s)) for s in squares]
    a = max(1, math.isqrt(sms))
    b = max(1, sms // a)
    m, n, k = a * tm, b * tn, 4096 if quick else 8192
    tiles = [(m, n), (m + tm // 2, n), (m - tm // 2, n), (2 * m, n), (2 * m + tm // 2, n)]
    if not quick:
        tiles += [(m, n + tn // 2), (m, n - tn // 2), (m // 2, n), (m // 2 + tm // 2, n)]
    cases += [("tile", "gemm", (mm, nn, k)) for mm, nn in tiles]
    checks = [(8192, 28672, 8192), (8192, 8192, 28672)]  # Llama-3-70B MLP, fwd and dgrad
    if not quick:
        checks += [(8192, 1024, 8192), (8192, 10240, 8192), (4096, 128256, 4096), (2048, 2048, 2048)]
    cases += [("check", "gemm", s) for s in checks]
    attn = [(1, 32, 4096, 128), (1, 32, 8192, 128), (4, 16, 2048, 128)]
    if not quick:
        attn += [(1, 16, 16384, 128), (2, 64, 4096, 64), (8, 32, 1024, 128)]
    for shape in attn:
        cases += [("attention", "attn_fwd", shape), ("attention", "attn_bwd", shape)]
    numel = (256 if quick else 512) * 2**20  # bf16 elements: 512 MiB / 1 GiB per tensor
    cases += [("hbm", "clone", (numel,)), ("hbm", "add", (numel,))]
    cases += [("launch", "tiny_add", ())]
    return cases


def collective_sizes(quick: bool) -> list[int]:
    """Message sizes in bytes: 32 KiB to 512 MiB by 4x (quick) or to 4 GiB by 2x."""
    return [2**e for e in (range(15, 30, 2) if quick else range(15, 33))]


def _build(kind: str, params: tuple, device: str):
    """(op overload, args) of one case on ``device`` ("meta" describes without running)."""
    import torch

    aten = torch.ops.aten
    bf16 = dict(dtype=torch.bfloat16, device=device)
    if kind == "gemm":
        m, n, k = params
        return aten.mm.default, (torch.randn(m, k, **bf16), torch.randn(k, n, **bf16))
    if kind in ("attn_fwd", "attn_bwd"):
        b, h, s, d = params
        q, kk, v = (torch.randn(b, h, s, d, **bf16) for _ in range(3))
        fwd = aten._scaled_dot_product_flash_attention.default
        args = (q, kk, v, 0.0, True)  # causal, as the models call it (simdist/models/kernels.py)
        if kind == "attn_fwd":
            return fwd, args
        o, lse, cq, ck, mq, mk, seed, offset, _ = fwd(*args)
        return (aten._scaled_dot_product_flash_attention_backward.default,
                (torch.randn_like(o), q, kk, v, o, lse, cq, ck, mq, mk, 0.0, True, seed, offset))
    if kind == "clone":
        return aten.clone.default, (torch.randn(params[0], **bf16),)
    if kind == "add":
        return aten.add.Tensor, (torch.randn(params[0], **bf16), torch.randn(params[0], **bf16))
    if kind == "tiny_add":
        return aten.add.Tensor, (torch.ones(1, **bf16), torch.ones(1, **bf16))
    raise ValueError(f"unknown kernel case kind {kind!r}")


def _row(role: str, kind: str, params: tuple, func, args: tuple, out) -> dict:  # noqa: ANN001
    """One op as the op recorder describes it (mode/ops.py, mode/streams.py, opcount.py)."""
    import torch
    from torch.utils._pytree import tree_iter

    from simdist.opcount import bytes_read, kernel_flops, tensor_bytes, written

    shapes = ";".join("x".join(map(str, t.shape)) + f":{str(t.dtype).removeprefix('torch.')}"
                      for t in tree_iter(args) if isinstance(t, torch.Tensor))
    return {"role": role, "case": kind, "params": list(params),
            "op": str(func._overloadpacket).removeprefix("aten."), "shapes": shapes,
            "flops": kernel_flops(func, args, {}, out),
            "bytes": bytes_read(func, args, {}) + tensor_bytes(written(func, args, {}, out))}


def describe(cases: Iterable[tuple[str, str, tuple]], device: str = "meta") -> list[dict]:
    """The kernel rows of ``cases`` without times (on meta: no memory, no GPU)."""
    rows = []
    for role, kind, params in cases:
        func, args = _build(kind, params, device)
        rows.append(_row(role, kind, params, func, args, func(*args)))
    return rows


# ------------------------------------------------------------------ timing (CUDA)


def _run_ahead(seconds: float) -> None:
    """Keep the GPU busy while the host queues the timed launches, so launches that the host
    issues slower than the GPU runs them are timed back to back, as in a training step."""
    import torch

    torch.cuda._sleep(int(seconds * 2e9))  # spin cycles at ~2 GHz (H100/H200 boost ~1.98)


def _time_cuda(fn: Callable[[], Any], target_s: float, trials: int,
               agree: Callable[[int], int] | None = None) -> tuple[float, dict]:
    """Seconds per call: the best over ``trials`` of the mean over ``reps`` back-to-back calls
    between two CUDA events, ``reps`` sized to take ``target_s``. Short calls are queued behind
    a spin kernel sized from the host's own queuing time of the trial before (so the GPU, not
    the host, sets their pace; ``host_bound`` says where that failed). ``agree`` makes every
    rank of a collective use the same ``reps``."""
    import time

    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-7)
    reps = int(min(max(target_s / one, 3), 10000))
    if agree is not None:
        reps = agree(reps)
    short = one < 1e-4
    ahead = reps * 25e-6 if short else 0.0
    means, host_bound = [], []
    for _ in range(trials + (1 if short else 0)):  # short calls: one extra trial sizes the spin
        if short:
            _run_ahead(ahead)
        t0 = time.perf_counter()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        host = time.perf_counter() - t0
        end.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / reps)
        host_bound.append(short and host >= ahead)
        if short:
            ahead = min(max(ahead, 1.5 * host), 2.0)
    ok = [m for m, h in zip(means, host_bound) if not h] or means
    return min(ok), {"reps": reps, "trial_means_s": means, "host_bound": all(host_bound) and short}


def _measure_kernels(cases: list, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    import torch

    rows = []
    target, trials = (0.05, 3) if quick else (0.2, 5)
    for i, (role, kind, params) in enumerate(cases):
        func, args = _build(kind, params, "cuda")
        row = _row(role, kind, params, func, args, func(*args))
        t, how = _time_cuda(lambda: func(*args), target, trials)  # noqa: B023
        row.update(time_s=t, **how)
        rows.append(row)
        rate = (f"{row['flops'] / t / 1e12:.1f} TF/s" if row["flops"] else
                f"{row['bytes'] / t / 1e12:.3f} TB/s" if role == "hbm" else f"{t * 1e6:.2f} us")
        progress(f"  [{i + 1}/{len(cases)}] {role:9s} {kind:8s} {'x'.join(map(str, params)):20s} "
                 f"{t * 1e3:10.4f} ms  {rate}")
        del func, args
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ collectives (NCCL)

_KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _collective_worker(rank: int, world: int, port: int, algo: str, sizes: list[int], quick: bool,
                       path: str) -> None:
    """One rank of a collective sweep (torch.multiprocessing.spawn); rank 0 writes the rows."""
    import datetime

    import torch
    import torch.distributed as dist

    if algo == "ring":
        os.environ["NCCL_ALGO"] = "Ring"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5),
                            device_id=torch.device("cuda", rank))
    target, trials = (0.02, 3) if quick else (0.1, 3)

    def agree(reps: int) -> int:
        t = torch.tensor([reps], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    rows = []
    for kind in _KINDS:
        for size in sizes:
            nbytes = size - size % (2 * world)  # whole bf16 elements per rank
            numel = nbytes // 2
            if kind == "all_reduce":
                x = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
                fn = lambda: dist.all_reduce(x)  # noqa: E731, B023
            elif kind == "all_gather":  # nbytes = the gathered output (collectives.py)
                x = torch.ones(numel // world, dtype=torch.bfloat16, device="cuda")
                y = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
                fn = lambda: dist.all_gather_into_tensor(y, x)  # noqa: E731, B023
            else:  # reduce_scatter: nbytes = the unscattered input
                x = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
                y = torch.empty(numel // world, dtype=torch.bfloat16, device="cuda")
                fn = lambda: dist.reduce_scatter_tensor(y, x)  # noqa: E731, B023
            dist.barrier()
            t, how = _time_cuda(fn, target, trials, agree)
            worst = torch.tensor([t], dtype=torch.float64, device="cuda")
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the slowest rank decides
            rows.append({"kind": kind, "algo": algo, "nbytes": nbytes, "group_size": world,
                         "time_s": float(worst.item()), "reps": how["reps"]})
            x = y = fn = None
    dist.destroy_process_group()
    if rank == 0:
        Path(path).write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_collectives(world: int, quick: bool, progress: Callable[[str], None]) -> tuple[list, list]:
    import torch.multiprocessing as mp

    rows, notes = [], []
    sizes = collective_sizes(quick)
    for algo in ("default", "ring"):
        progress(f"  collectives over {world} GPUs, NCCL algorithm {algo}: "
                 f"{len(_KINDS)} kinds x {len(sizes)} sizes")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.json")
            try:
                mp.spawn(_collective_worker, args=(world, _free_port(), algo, sizes, quick, path),
                         nprocs=world, join=True)
                got = json.loads(Path(path).read_text())
            except Exception as e:  # noqa: BLE001 - a failed sweep is a note, not a crash
                notes.append(f"collectives with NCCL algorithm {algo} failed: "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                continue
        for r in got:
            progress(f"    {r['kind']:14s} {r['nbytes']:>12d} B  {r['time_s'] * 1e6:10.1f} us")
        rows += got
    return rows, notes


def measure(preset: str, quick: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Every measurement on this machine's GPUs (device 0 for kernels), as JSON-able data."""
    import torch
    import torch.distributed

    props = torch.cuda.get_device_properties(0)
    sms = int(props.multi_processor_count)
    cal = default_calibration()
    cases = kernel_cases(quick, sms, cal.gemm_tile(preset))
    torch.cuda.set_device(0)
    progress(f"kernels on {torch.cuda.get_device_name(0)}: {len(cases)} cases")
    meas: dict[str, Any] = {"sm_count": sms, "kernels": _measure_kernels(cases, quick, progress)}
    world = torch.cuda.device_count()
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        meas["collectives"], notes = _measure_collectives(world, quick, progress)
        if notes:
            meas["collectives_note"] = "; ".join(notes)
    else:
        meas["collectives"] = []
        meas["collectives_note"] = (
            f"{world} CUDA GPU{'s' if world != 1 else ''} with"
            f"{'' if world > 1 else 'out'} NCCL between them: collectives not measured (they "
            "need 2 or more local GPUs); the NCCL keys keep their defaults")
        progress(f"  {meas['collectives_note']}")
    return meas


def _device_info() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    nccl = None
    try:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        pass
    return {"name": torch.cuda.get_device_name(0), "sm_count": int(p.multi_processor_count),
            "total_memory_bytes": int(p.total_memory), "device_count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "nccl_algo_env": os.environ.get("NCCL_ALGO")}


# ------------------------------------------------------------------ the command


def _error(msg: str) -> int:
    print(f"simdist: invalid input: {msg}", file=sys.stderr)
    return EXIT_INPUT


def calibrate_command(out: str | None, gpu: str | None, quick: bool) -> int:
    """`simdist calibrate [--out PATH] [--gpu NAME] [--quick]`: 0 written, 2 no GPU or bad input."""
    from simdist.costmodel.hardware import PRESETS, gpu_spec

    if gpu is not None and gpu not in PRESETS:
        return _error(f"--gpu: unknown GPU preset {gpu!r}; allowed: {', '.join(sorted(PRESETS))}")
    if out is not None and str(out).endswith(".json"):
        return _error(f"--out {out}: the table is Parquet (.parquet) or Arrow IPC (any other "
                      "suffix); .json is the name of its sidecar")
    try:
        import torch

        has_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - no torch, a broken driver: no usable GPU either way
        has_gpu = False
    if not has_gpu:
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_INPUT

    name = torch.cuda.get_device_name(0)
    detected = detect_preset(name)
    preset = gpu or detected
    if preset is None:
        return _error(f"--gpu: cannot tell which GPU preset {name!r} is; pass --gpu NAME "
                      f"(allowed: {', '.join(sorted(PRESETS))})")
    path = Path(out) if out else Path(f"calibration-{preset}.parquet")
    sidecar = path.with_suffix(".json")
    if path.exists():
        try:
            load_calibration(path)
        except ValueError:
            return _error(f"--out {path} exists and is not a calibration table; not replacing it")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True)
    if gpu and detected and gpu != detected:
        print(f"note: device {name!r} looks like preset {detected}; writing rows for --gpu {gpu}")

    from simdist.costmodel.fit import FIT_KEYS, check_rows, fit_calibration

    spec = gpu_spec(preset)
    info = _device_info()
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    print(f"simdist calibrate: {name} as preset {preset}{' (quick)' if quick else ''}, "
          f"torch {torch.__version__}, {info['device_count']} GPU(s)")
    meas = measure(preset, quick)
    fit = fit_calibration(meas, spec)
    source = f"measured by simdist calibrate on {name}, torch {torch.__version__}, {date}"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    fit.table(source).write(tmp)
    os.replace(tmp, path)
    cal = load_calibration(path)
    default = default_calibration()
    checks = check_rows(meas, spec, cal)
    keys = [k for k in FIT_KEYS if k in fit.values]
    report = {
        "gpu": preset, "device": info, "date": date, "quick": quick, "table": str(path),
        "source": source,
        "fitted": {k: fit.values[k] for k in keys},
        "defaults": {k: default.get(k, preset) for k in keys},
        "details": {k: fit.details.get(k, "") for k in keys},
        "notes": fit.notes, "measurements": meas, "check": checks,
    }
    sidecar.write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"wrote {path} ({len(keys)} rows for {preset}) and {sidecar}")
    return EXIT_OK


def summary(report: dict) -> str:
    """The fitted constants next to the defaults, and the model's error per kind of row."""
    lines = [f"{'key':34s} {'measured':>12s} {'default':>12s} {'ratio':>7s}"]
    for k, v in report["fitted"].items():
        d = report["defaults"][k]
        ratio = f"{v / d:7.3f}" if d else "      -"
        lines.append(f"{k:34s} {v:12.6g} {d:12.6g} {ratio}")
    groups: dict[str, list[float]] = {}
    for c in report["check"]:
        if c["rel_err"] is not None:
            g = c.get("role") or f"{c['kind']}/{c['algo']}"
            groups.setdefault(g, []).append(c["rel_err"])
    if groups:
        lines.append("model / measured - 1 under the written table, per kind of row:")
        for g, errs in groups.items():
            worst = max(errs, key=abs)
            lines.append(f"  {g:28s} {len(errs):3d} rows  median {sorted(errs)[len(errs) // 2]:+7.1%}"
                         f"  worst {worst:+7.1%}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
