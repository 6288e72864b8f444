"""Measured kernel and collective times -> the calibration table's constants: the inverse of
kernels.py and collectives.py, so that a table fitted here makes those models reproduce the
measurements (`simdist calibrate` measures; this module only converts, and runs on any CPU).

Measurements are plain JSON-able data (the sidecar `simdist calibrate` writes):

    {"sm_count": 132,                                  # the device's SMs (or null)
     "kernels": [{"role": R, "op": "mm", "shapes": "4096x4096:bfloat16;...",
                  "flops": F, "bytes": B, "time_s": T}, ...],
     "collectives": [{"kind": "all_reduce", "algo": "default" | "ring", "nbytes": N,
                      "group_size": n, "time_s": T}, ...]}

A kernel row is one launch of one op, described as the op recorder describes it (name without
``aten.``, input shapes, torch's FLOP formula, bytes of inputs and outputs). Roles and what each
fits, in this order (each fit uses the constants before it):

* ``launch``: a tiny kernel, timed back to back behind a running one: ``launch_floor_s`` = the
  median time (the model's floor is what a launch costs when nothing else bounds it).
* ``hbm``: large pointwise ops (clone, add): ``hbm_fraction`` = sum(bytes) / (HBM bandwidth x
  sum(time)), so the model reproduces their total time.
* ``ceiling`` (large square GEMMs): ``gemm_ceiling`` = max over rows of
  flops / (peak x q x time), q the model's own tile / wave quantisation of the shape
  (``kernels.gemm_quantisation``; 0.97 for 8192^2 on 132 SMs): the best achieved, as the
  max-achievable-matmul figures are. ``tile`` and ``check`` GEMMs fit nothing; their model
  error is reported (``check_rows``), which tests the quantisation model itself.
* ``attention`` (flash forward / backward rows, told apart by op name): ``attn_fwd_efficiency``,
  ``attn_bwd_efficiency`` = sum(flops) / (peak x sum(time)) over each pass.
  Rows that the model would call memory- or launch-bound (that term over half the measured
  time) fit no FLOP constant.
* collectives (one node, ``Placement(n, 1)``): ``nccl_latency_scale``,
  ``ring_busbw_fraction.nvlink``, ``nvls_busbw_fraction.all_reduce`` / ``.gather`` by a fixed
  point over the model's own candidates (collectives._candidates): for each row the candidate
  the model picks under the current constants (``algo: ring`` rows: ring candidates only, as
  NCCL_ALGO=Ring forces) gives a time ``scale * latency + factor * nbytes / busbw``; rows where
  the latency term is >= 80% of it estimate the scale, rows where it is <= 20% estimate the
  bandwidth fraction of their candidate; medians, repeated until nothing changes (for 20
  rounds each row's use and candidate follow the constants, then they are frozen so that rows
  near a threshold cannot make the fit cycle). NVLS is
  judged in use for all_reduce (or for all_gather / reduce_scatter, ``.gather``) at the sizes
  where the default run is over 3% faster than the forced ring; with a forced-ring run and no
  such size its fraction is 0 (not used), without one it is not fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from simdist.costmodel.calibration import CALIBRATION_SCHEMA, Calibration, default_calibration
from simdist.costmodel.collectives import _BUS_FACTOR, Placement, _candidates
from simdist.costmodel.hardware import GPUSpec
from simdist.costmodel.kernels import OpClass, gemm_dims, gemm_quantisation, kernel_times, op_class

__all__ = ["FIT_KEYS", "Fit", "check_rows", "collective_model_times", "fit_calibration",
           "kernel_model_times", "with_values"]

# every key a fit can write, in fit order
FIT_KEYS = ("sm_count", "launch_floor_s", "hbm_fraction", "gemm_ceiling", "attn_fwd_efficiency",
            "attn_bwd_efficiency", "nccl_latency_scale", "ring_busbw_fraction.nvlink",
            "nvls_busbw_fraction.all_reduce", "nvls_busbw_fraction.gather")
_BOUND_SHARE = 0.5  # a kernel row fits a FLOP constant only if memory / floor explain < half
_LAT_SHARE, _BW_SHARE = 0.8, 0.2  # latency-dominated / bandwidth-dominated collective rows
_NVLS_GAIN = 0.97  # default run faster than this x forced ring: NVLS (not ring) in use
_FREE, _FROZEN = 20, 200  # fixed-point rounds choosing each row's use, then with it frozen
_LIMITS = {  # the table's ranges (calibration._KINDS); a fit outside is clamped, with a note
    "gemm_ceiling": (1e-6, 1.0), "attn_fwd_efficiency": (1e-6, 1.0),
    "attn_bwd_efficiency": (1e-6, 1.0), "hbm_fraction": (1e-6, 1.0),
    "ring_busbw_fraction.nvlink": (1e-6, 1.0), "nvls_busbw_fraction.all_reduce": (0.0, 2.0),
    "nvls_busbw_fraction.gather": (0.0, 2.0), "nccl_latency_scale": (1e-6, math.inf),
    "launch_floor_s": (0.0, math.inf),
}


@dataclass
class Fit:
    """Fitted constants for one GPU preset: ``values[key]``, ``details[key]`` (how, in words,
    for the table's source column) and notes on what could not be fitted."""

    gpu: str
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def rows(self, source: str) -> list[tuple[str, str, float, str]]:
        """(gpu, key, value, source) rows; the source is ``source``, then the detail."""
        return [(self.gpu, k, float(self.values[k]),
                 f"{source}: {self.details[k]}" if self.details.get(k) else source)
                for k in FIT_KEYS if k in self.values]

    def table(self, source: str) -> Calibration:
        """The fitted rows alone, as a Calibration (``write`` it; ``load_calibration`` puts
        the defaults under it)."""
        rows = self.rows(source)
        g, k, v, s = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
        return Calibration.from_table(pa.table({"gpu": g, "key": k, "value": v, "source": s},
                                               schema=CALIBRATION_SCHEMA))


def with_values(base: Calibration, gpu: str, values: Mapping[str, float]) -> Calibration:
    """``base`` with ``values`` as rows for ``gpu``."""
    if not values:
        return base
    keys = list(values)
    t = pa.table({"gpu": [gpu] * len(keys), "key": keys, "value": [float(values[k]) for k in keys],
                  "source": ["fit"] * len(keys)}, schema=CALIBRATION_SCHEMA)
    return Calibration.from_table(t, base=base)


# ------------------------------------------------------------------ forward models


def _ops(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    return {"op": [r["op"] for r in rows], "phase": ["calibrate"] * len(rows),
            "module": [""] * len(rows), "shapes": [r["shapes"] for r in rows],
            "count": [1] * len(rows), "flops": [r["flops"] for r in rows],
            "bytes": [r["bytes"] for r in rows]}


def kernel_model_times(rows: Sequence[Mapping[str, Any]], gpu: GPUSpec, cal: Calibration) -> np.ndarray:
    """kernels.kernel_times of each measurement row (one launch)."""
    if not rows:
        return np.zeros(0)
    return kernel_times(_ops(rows), gpu, cal)


def _cands(row: Mapping[str, Any], gpu: GPUSpec, cal: Calibration) -> list:
    n = int(row["group_size"])
    cands = _candidates(row["kind"], n, Placement(n, 1), gpu, cal, 1.0)
    if row.get("algo", "default") == "ring":
        cands = [c for c in cands if c.algorithm == "ring"]
    return cands


def _coll_terms(row: Mapping[str, Any], gpu: GPUSpec, cal: Calibration, algorithm: str | None = None,
                protocol: str | None = None):
    """(candidate, latency term, bandwidth term) of the candidate the model picks for a row
    (or the best one of ``algorithm`` / ``protocol``); None if there is none."""
    scale = cal.nccl_latency_scale(gpu.name)
    factor = _BUS_FACTOR[row["kind"]](int(row["group_size"]))
    best = None
    for c in _cands(row, gpu, cal):
        if (algorithm is not None and c.algorithm != algorithm) or \
                (protocol is not None and c.protocol != protocol):
            continue
        lat, bw = scale * c.latency_s, factor * float(row["nbytes"]) / c.busbw
        if best is None or lat + bw < best[1] + best[2]:
            best = (c, lat, bw)
    return best


def collective_model_times(rows: Sequence[Mapping[str, Any]], gpu: GPUSpec, cal: Calibration) -> np.ndarray:
    """The model's time of each collective row (one node; ``algo: ring`` rows: ring only)."""
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        if int(r["group_size"]) > 1 and float(r["nbytes"]) > 0:
            _, lat, bw = _coll_terms(r, gpu, cal)
            out[i] = lat + bw
    return out


def check_rows(meas: Mapping[str, Any], gpu: GPUSpec, cal: Calibration) -> list[dict]:
    """Every measured row with the model's time under ``cal`` and the relative error."""
    out = []
    for what, rows, model in (("kernel", meas.get("kernels") or [], kernel_model_times),
                              ("collective", meas.get("collectives") or [], collective_model_times)):
        pred = model(rows, gpu, cal)
        for r, p in zip(rows, pred):
            t = float(r["time_s"])
            row = {k: r[k] for k in ("role", "op", "shapes", "kind", "algo", "nbytes", "group_size")
                   if k in r}
            out.append({"what": what, **row, "time_s": t, "model_s": float(p),
                        "rel_err": float(p / t - 1) if t > 0 else None})
    return out


# ------------------------------------------------------------------ the fit


def _clamp(fit: Fit, key: str, v: float) -> float:
    lo, hi = _LIMITS.get(key, (-math.inf, math.inf))
    if not lo <= v <= hi:
        fit.notes.append(f"{key}: fitted {v:.6g} is outside [{lo:g}, {hi:g}]; clamped")
        v = min(max(v, lo), hi)
    return v


def _set(fit: Fit, key: str, v: float, detail: str) -> None:
    fit.values[key] = _clamp(fit, key, float(v))
    fit.details[key] = detail


def fit_calibration(meas: Mapping[str, Any], gpu: GPUSpec, base: Calibration | None = None) -> Fit:
    """The constants that make kernels.py / collectives.py reproduce ``meas`` on ``gpu``
    (see the module doc). Keys without measurements are left out (the defaults stay)."""
    base = base or default_calibration()
    g = gpu.name
    fit = Fit(g)
    kernels = [r for r in meas.get("kernels") or [] if float(r["time_s"]) > 0]
    by_role: dict[str, list] = {}
    for r in kernels:
        by_role.setdefault(r["role"], []).append(r)

    if meas.get("sm_count"):
        _set(fit, "sm_count", int(meas["sm_count"]), "torch.cuda.get_device_properties")

    launch = by_role.get("launch", [])
    if launch:
        t = float(np.median([r["time_s"] for r in launch]))
        _set(fit, "launch_floor_s", t, f"{'median of ' + str(len(launch)) + ' ' if len(launch) > 1 else ''}"
             f"1-element kernel timed back to back behind a running one: {t * 1e6:.2f} us each")
    cal = with_values(base, g, fit.values)

    floor = cal.launch_floor_s(g)
    hbm = [r for r in by_role.get("hbm", []) if r["bytes"] / gpu.hbm_bw > floor]
    if hbm:
        b, t = sum(r["bytes"] for r in hbm), sum(r["time_s"] for r in hbm)
        _set(fit, "hbm_fraction", b / (gpu.hbm_bw * t), f"{len(hbm)} large "
             f"{'/'.join(sorted({r['op'] for r in hbm}))} ops: {b / t / 1e12:.3f} TB/s of "
             f"{gpu.hbm_bw / 1e12:.3f}")
        cal = with_values(base, g, fit.values)

    mem_bw = gpu.hbm_bw * cal.hbm_fraction(g)
    floor = cal.launch_floor_s(g)

    def compute_bound(r: Mapping[str, Any]) -> bool:
        return max(r["bytes"] / mem_bw, floor) < _BOUND_SHARE * r["time_s"] and r["flops"] > 0

    sms, tile, splitk = cal.sm_count(g), cal.gemm_tile(g), cal.gemm_splitk_min_k(g)
    best = None
    for r in by_role.get("ceiling", []):
        dims = gemm_dims(r["op"], r["shapes"])
        if op_class(r["op"]) is not OpClass.GEMM or dims is None or not compute_bound(r):
            continue
        q = gemm_quantisation(dims[0], dims[1], dims[2], sms, tile, dims[3], splitk)
        peak = _peak(gpu, r)
        c = r["flops"] / (peak * q * r["time_s"])
        if best is None or c > best[0]:
            best = (c, dims, q, r["flops"] / r["time_s"])
    if best is not None:
        c, (b, m, n, k), q, rate = best
        shape = f"{m}x{n}x{k}" + (f" (batch {b})" if b > 1 else "")
        _set(fit, "gemm_ceiling", c, f"best of the large square GEMMs, {shape} at "
             f"{rate / 1e12:.1f} TF/s, model quantisation {q:.4f}")
    for key, cls in (("attn_fwd_efficiency", OpClass.ATTENTION_FWD),
                     ("attn_bwd_efficiency", OpClass.ATTENTION_BWD)):
        rows = [r for r in by_role.get("attention", []) if op_class(r["op"]) is cls and compute_bound(r)]
        if rows:
            f, t = sum(r["flops"] for r in rows), sum(r["time_s"] for r in rows)
            _set(fit, key, f / (_peak(gpu, rows[0]) * t), f"{len(rows)} flash attention "
                 f"{'forward' if cls is OpClass.ATTENTION_FWD else 'backward'} shapes at "
                 f"{f / t / 1e12:.1f} TF/s (torch's FLOP formula)")
    cal = with_values(base, g, fit.values)

    colls = [r for r in meas.get("collectives") or []
             if int(r["group_size"]) > 1 and float(r["nbytes"]) > 0 and float(r["time_s"]) > 0]
    if colls:
        _fit_collectives(fit, colls, gpu, cal)
    elif meas.get("collectives_note"):
        fit.notes.append(meas["collectives_note"])
    return fit


def _peak(gpu: GPUSpec, row: Mapping[str, Any]) -> float:
    first = str(row["shapes"]).split(";")[0]
    dt = first.partition(":")[2] or "bf16"
    return gpu.flops_for(dt)


def _nvls_sizes(colls: list, group: tuple[str, ...]) -> tuple[list, bool]:
    """Default-run rows of ``group`` where NVLS beat the forced ring, and whether a forced-ring
    run of the group exists to tell."""
    ring = {(r["kind"], int(r["group_size"]), float(r["nbytes"])): float(r["time_s"])
            for r in colls if r.get("algo") == "ring" and r["kind"] in group}
    won = []
    for r in colls:
        if r.get("algo", "default") != "default" or r["kind"] not in group:
            continue
        t_ring = ring.get((r["kind"], int(r["group_size"]), float(r["nbytes"])))
        if t_ring is not None and float(r["time_s"]) < _NVLS_GAIN * t_ring:
            won.append(r)
    return won, bool(ring)


def _fit_collectives(fit: Fit, colls: list, gpu: GPUSpec, cal0: Calibration) -> None:
    g = gpu.name
    groups = {"nvls_busbw_fraction.all_reduce": ("all_reduce",),
              "nvls_busbw_fraction.gather": ("all_gather", "reduce_scatter")}
    nvls_rows, nvls_known = {}, {}
    for key, kinds in groups.items():
        if not any(r["kind"] in kinds for r in colls):
            continue
        nvls_rows[key], nvls_known[key] = _nvls_sizes(colls, kinds)
    has_ring = any(r.get("algo") == "ring" for r in colls)
    vals = {"nccl_latency_scale": cal0.nccl_latency_scale(g),
            "ring_busbw_fraction.nvlink": cal0.ring_busbw_fraction(g, "nvlink")}
    for key in nvls_rows:
        if nvls_rows[key]:  # start where the model lets NVLS win, whatever the default says
            vals[key] = max(cal0.get(key, g), 0.5)
        elif nvls_known[key]:
            vals[key] = 0.0
    used: dict[str, int] = {}
    frozen: dict[int, tuple] = {}  # row -> (use, algorithm, protocol), fixed after _FREE rounds
    for rnd in range(_FREE + _FROZEN):
        cal = with_values(cal0, g, vals)
        scale = vals["nccl_latency_scale"]
        s_est, r_est = [], []
        v_est: dict[str, list] = {k: [] for k in nvls_rows}
        for i, r in enumerate(colls):
            if i in frozen:
                use, alg, proto = frozen[i]
                c, lat, bw = _coll_terms(r, gpu, cal, alg, proto)
            else:
                c, lat, bw = _coll_terms(r, gpu, cal)
                total = lat + bw
                use = None
                if lat >= _LAT_SHARE * total and c.latency_s > 0:
                    use = "scale"
                elif lat <= _BW_SHARE * total and c.algorithm == "ring" \
                        and (has_ring is False or r.get("algo") == "ring"):
                    uncapped = (gpu.nvlink_bw * vals["ring_busbw_fraction.nvlink"]
                                * cal.proto_bw_fraction(g, "ring", c.protocol))
                    if c.protocol != "ll" or uncapped <= cal.ll_max_busbw(g, "nvlink"):
                        use = "ring"
                if rnd + 1 >= _FREE:
                    frozen[i] = (use, c.algorithm, c.protocol)
            t = float(r["time_s"])
            if use == "scale":
                s_est.append((t - bw) / c.latency_s)
            elif use == "ring" and t > lat:
                pf = cal.proto_bw_fraction(g, "ring", c.protocol)
                factor = _BUS_FACTOR[r["kind"]](int(r["group_size"]))
                r_est.append(factor * float(r["nbytes"]) / ((t - lat) * gpu.nvlink_bw * pf))
        for key, rows in nvls_rows.items():
            for r in rows:
                terms = _coll_terms(r, gpu, cal, "nvls")
                if terms is None:
                    continue
                c, lat, bw = terms
                t = float(r["time_s"])
                if lat <= _BW_SHARE * t and t > lat:
                    factor = _BUS_FACTOR[r["kind"]](int(r["group_size"]))
                    v_est[key].append(factor * float(r["nbytes"]) / ((t - lat) * gpu.nvlink_bw))
        new = dict(vals)
        if s_est:
            new["nccl_latency_scale"] = max(float(np.median(s_est)), 1e-6)
        if r_est:
            new["ring_busbw_fraction.nvlink"] = min(max(float(np.median(r_est)), 1e-6), 1.0)
        for key, est in v_est.items():
            if est:
                new[key] = min(max(float(np.median(est)), 0.0), 2.0)
        used = {"scale": len(s_est), "ring": len(r_est), **{k: len(v) for k, v in v_est.items()}}
        done = all(math.isclose(new[k], vals[k], rel_tol=1e-13, abs_tol=1e-300) for k in new)
        vals = new
        if done:
            break
    else:
        fit.notes.append(f"collective fit: no fixed point after {_FREE + _FROZEN} rounds; "
                         "last values kept")

    n = sorted({int(r["group_size"]) for r in colls})
    where = f"{'/'.join(map(str, n))} local GPUs"
    if used.get("scale"):
        _set(fit, "nccl_latency_scale", vals["nccl_latency_scale"], f"{used['scale']} small "
             f"collectives over {where}: measured / the tuner's latency (collectives.py)")
    else:
        fit.notes.append("nccl_latency_scale: no latency-bound collective measured; not fitted")
    if used.get("ring"):
        ring_bus = vals["ring_busbw_fraction.nvlink"] * gpu.nvlink_bw
        _set(fit, "ring_busbw_fraction.nvlink", vals["ring_busbw_fraction.nvlink"],
             f"{used['ring']} large {'NCCL_ALGO=Ring ' if has_ring else ''}collectives over "
             f"{where}: {ring_bus / 1e9:.0f} GB/s busbw of {gpu.nvlink_bw / 1e9:.0f}")
    else:
        fit.notes.append("ring_busbw_fraction.nvlink: no bandwidth-bound ring collective; not fitted")
    for key in nvls_rows:
        if used.get(key):
            _set(fit, key, vals[key], f"{used[key]} large default-algorithm collectives over "
                 f"{where} faster than the forced ring: {vals[key] * gpu.nvlink_bw / 1e9:.0f} "
                 "GB/s busbw through the switch")
        elif nvls_known[key] and not nvls_rows[key]:
            _set(fit, key, 0.0, f"default algorithm no faster than NCCL_ALGO=Ring over {where} "
                 "at any size: NVLS not used (0)")
        else:
            fit.notes.append(f"{key}: no forced-ring run to compare with; not fitted")
