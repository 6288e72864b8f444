"""`simdist calibrate` on a CPU: the conversion of measurements into the table's constants
(synthetic measurements made by the time model itself from known constants must give those
constants back), the table it writes, the command's exit 2 without a GPU, and the config key
``cluster.calibration``. The measuring itself needs a CUDA GPU: benchmarks/calibrate_gpu.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simdist.calibrate import (
    NO_GPU_MESSAGE,
    calibrate_command,
    calibration_for,
    collective_sizes,
    describe,
    detect_preset,
    kernel_cases,
)
from simdist.config import ConfigError, load_config
from simdist.costmodel import CALIBRATION_SCHEMA, Calibration, default_calibration, gpu_spec, load_calibration
from simdist.costmodel.fit import (
    FIT_KEYS,
    check_rows,
    collective_model_times,
    fit_calibration,
    kernel_model_times,
    with_values,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = default_calibration()
H200 = gpu_spec("h200")
A100 = gpu_spec("a100-80gb")

KERNEL_TRUTH = {"sm_count": 132, "gemm_ceiling": 0.71, "attn_fwd_efficiency": 0.63,
                "attn_bwd_efficiency": 0.47, "hbm_fraction": 0.87, "launch_floor_s": 3.1e-6}


def _kernel_meas(quick: bool, gpu=H200, truth=KERNEL_TRUTH) -> tuple[dict, list[dict]]:
    cal = with_values(DEFAULT, gpu.name, truth)
    rows = describe(kernel_cases(quick, int(truth["sm_count"]), cal.gemm_tile(gpu.name)), "meta")
    for r, t in zip(rows, kernel_model_times(rows, gpu, cal)):
        r["time_s"] = float(t)
    return {"sm_count": truth["sm_count"], "kernels": rows, "collectives": []}, rows


@pytest.mark.parametrize("quick", [True, False])
def test_kernel_round_trip_recovers_the_constants(quick):
    meas, rows = _kernel_meas(quick)
    fit = fit_calibration(meas, H200)
    assert set(fit.values) == set(KERNEL_TRUTH)
    for k, v in KERNEL_TRUTH.items():
        assert fit.values[k] == pytest.approx(v, rel=1e-9), k
    # every measured row, also the tile-edge and check GEMMs, is reproduced by the fitted table
    back = kernel_model_times(rows, H200, with_values(DEFAULT, "h200", fit.values))
    np.testing.assert_allclose(back, [r["time_s"] for r in rows], rtol=1e-9)
    assert not fit.notes


def test_kernel_round_trip_other_sm_count_and_tile_quantisation():
    truth = {**KERNEL_TRUTH, "sm_count": 114, "gemm_ceiling": 0.66}  # an H100 PCIe-like part
    meas, rows = _kernel_meas(False, gpu_spec("h100-sxm"), truth)
    fit = fit_calibration(meas, gpu_spec("h100-sxm"))
    assert fit.values["gemm_ceiling"] == pytest.approx(0.66, rel=1e-9)
    assert fit.values["sm_count"] == 114
    tiles = {tuple(r["params"]): r["time_s"] for r in rows if r["role"] == "tile"}
    (m, n, k), t_wave = next(iter(tiles.items()))
    # half a tile more rows than a whole wave: the model's quantisation step, on 114 SMs
    from simdist.costmodel.kernels import gemm_quantisation

    tile = default_calibration().gemm_tile("h100-sxm")
    q = lambda rows: gemm_quantisation(1, rows, n, 114, tile, k, 256)  # noqa: E731
    assert tiles[(m + 64, n, k)] / t_wave == pytest.approx((m + 64) / m * q(m) / q(m + 64),
                                                            rel=1e-6)
    assert tiles[(m + 64, n, k)] > 1.05 * t_wave


def test_gemm_ceiling_is_the_best_large_square_after_quantisation():
    meas, rows = _kernel_meas(True)
    for r in rows:  # the 4096^3 GEMM runs 10% slower than the model: the best (8192^3) decides
        if r["role"] == "ceiling" and r["params"] == [4096, 4096, 4096]:
            r["time_s"] *= 1.1
    fit = fit_calibration(meas, H200)
    assert fit.values["gemm_ceiling"] == pytest.approx(0.71, rel=1e-9)
    assert "8192x8192x8192" in fit.details["gemm_ceiling"]
    # 8192^2 over 132 SMs in 128x256 tiles: 2048 tiles in 16 waves, q = 0.9697 (not 1)
    assert "0.9697" in fit.details["gemm_ceiling"]


def test_noisy_measurements_fit_within_their_noise():
    meas, rows = _kernel_meas(False)
    rng = np.random.default_rng(0)
    for r in rows:
        r["time_s"] *= float(rng.uniform(0.99, 1.01))
    fit = fit_calibration(meas, H200)
    for k, v in KERNEL_TRUTH.items():
        assert fit.values[k] == pytest.approx(v, rel=0.011), k


def test_fractions_above_one_are_clamped_with_a_note():
    meas, _ = _kernel_meas(True)
    for r in meas["kernels"]:
        if r["role"] == "ceiling":
            r["time_s"] *= 0.5  # twice the model's speed: 1.42 of peak
    fit = fit_calibration(meas, H200)
    assert fit.values["gemm_ceiling"] == 1.0
    assert any("gemm_ceiling" in n and "clamped" in n for n in fit.notes)


def test_row_description_matches_the_op_recorder():
    import torch

    from simdist.mode.ops import _items
    from simdist.mode.streams import op_row_key
    from simdist.opcount import is_write_only, kernel_flops
    from simdist.trace import OpEvent, OpHead

    cases = [c for c in kernel_cases(True, 132, (128, 256)) if c[1] in ("gemm", "attn_bwd", "add")]
    for (role, kind, params), row in zip(cases, describe(cases)):
        from simdist.calibrate import _build

        func, args = _build(kind, params, "meta")
        out = func(*args)
        head = OpHead(str(func._overloadpacket).removeprefix("aten."), "p", "m", 1,
                      kernel_flops(func, args, {}, out), is_write_only(func))
        (op, _, _, shapes), _, flops, nbytes = op_row_key(OpEvent(head, _items(args, out)))
        assert (row["op"], row["shapes"], row["flops"], row["bytes"]) == (op, shapes, flops, nbytes)
    assert isinstance(torch.__version__, str)


# ------------------------------------------------------------------ collectives


def _coll_meas(gpu, truth: dict, n: int, algos=("default", "ring"), sizes=None) -> dict:
    cal = with_values(DEFAULT, gpu.name, truth)
    rows = [{"kind": k, "algo": a, "nbytes": s - s % (2 * n), "group_size": n}
            for a in algos for k in ("all_reduce", "all_gather", "reduce_scatter")
            for s in (sizes or collective_sizes(False))]
    for r, t in zip(rows, collective_model_times(rows, gpu, cal)):
        r["time_s"] = float(t)
    return {"collectives": rows}


COLL_TRUTH = {"nccl_latency_scale": 2.1, "ring_busbw_fraction.nvlink": 0.77,
              "nvls_busbw_fraction.all_reduce": 1.02, "nvls_busbw_fraction.gather": 0.81}


@pytest.mark.parametrize("quick", [True, False])
def test_collective_round_trip_with_nvls(quick):
    meas = _coll_meas(H200, COLL_TRUTH, 8, sizes=collective_sizes(quick))
    fit = fit_calibration(meas, H200)
    for k, v in COLL_TRUTH.items():
        assert fit.values[k] == pytest.approx(v, rel=1e-6), k
    back = collective_model_times(meas["collectives"], H200, with_values(DEFAULT, "h200", fit.values))
    np.testing.assert_allclose(back, [r["time_s"] for r in meas["collectives"]], rtol=1e-6)


def test_collective_round_trip_without_nvls_writes_zero():
    truth = {"nccl_latency_scale": 3.0, "ring_busbw_fraction.nvlink": 0.7}
    meas = _coll_meas(A100, truth, 4)
    fit = fit_calibration(meas, A100)
    assert fit.values["nccl_latency_scale"] == pytest.approx(3.0, rel=1e-6)
    assert fit.values["ring_busbw_fraction.nvlink"] == pytest.approx(0.7, rel=1e-6)
    assert fit.values["nvls_busbw_fraction.all_reduce"] == 0.0
    assert fit.values["nvls_busbw_fraction.gather"] == 0.0
    assert "no faster than NCCL_ALGO=Ring" in fit.details["nvls_busbw_fraction.all_reduce"]


def test_collectives_without_a_forced_ring_run_leave_nvls_unfitted():
    truth = {"nccl_latency_scale": 1.8, "ring_busbw_fraction.nvlink": 0.9}
    fit = fit_calibration(_coll_meas(A100, truth, 2, algos=("default",)), A100)
    assert fit.values["nccl_latency_scale"] == pytest.approx(1.8, rel=1e-6)
    assert fit.values["ring_busbw_fraction.nvlink"] == pytest.approx(0.9, rel=1e-6)
    assert "nvls_busbw_fraction.all_reduce" not in fit.values
    assert any("nvls_busbw_fraction" in n and "not fitted" in n for n in fit.notes)


def test_single_gpu_note_and_no_collective_keys():
    meas, _ = _kernel_meas(True)
    meas["collectives_note"] = "1 CUDA GPU without NCCL between them: collectives not measured"
    fit = fit_calibration(meas, H200)
    assert not {"nccl_latency_scale", "ring_busbw_fraction.nvlink"} & set(fit.values)
    assert fit.notes == [meas["collectives_note"]]


# ------------------------------------------------------------------ the table


def test_written_table_schema_sources_and_load(tmp_path):
    meas, rows = _kernel_meas(True)
    meas.update(_coll_meas(H200, COLL_TRUTH, 8, sizes=collective_sizes(True)))
    fit = fit_calibration(meas, H200)
    source = "measured by simdist calibrate on NVIDIA H200, torch 2.11.0+cu130, 2026-11-20"
    for name in ("cal.parquet", "cal.arrow"):
        fit.table(source).write(tmp_path / name)
        cal = load_calibration(tmp_path / name)
        for k in FIT_KEYS:
            assert cal.get(k, "h200") == pytest.approx(fit.values[k], rel=1e-12)
            assert cal.source(k, "h200").startswith(source + ": ")
        assert cal.gemm_ceiling("b200") == DEFAULT.gemm_ceiling("b200")  # other GPUs: defaults
        assert cal.sm_count("h200") == 132
    t = pq.read_table(tmp_path / "cal.parquet")
    assert t.schema.equals(CALIBRATION_SCHEMA)
    assert set(t.column("gpu").to_pylist()) == {"h200"}
    assert sorted(t.column("key").to_pylist()) == sorted(FIT_KEYS)
    # the loaded table reproduces every measurement
    checks = check_rows(meas, H200, load_calibration(tmp_path / "cal.parquet"))
    assert len(checks) == len(meas["kernels"]) + len(meas["collectives"])
    assert max(abs(c["rel_err"]) for c in checks) < 1e-6
    json.dumps(checks)  # the sidecar's rows are JSON


def test_detect_preset():
    assert detect_preset("NVIDIA H200") == "h200"
    assert detect_preset("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert detect_preset("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert detect_preset("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert detect_preset("NVIDIA B200") == "b200"
    assert detect_preset("AMD Instinct MI300X") == "mi300x"
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA L40S",
                  "NVIDIA A100-PCIE-40GB"):
        assert detect_preset(other) is None, other


# ------------------------------------------------------------------ the command on a CPU


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SIMDIST_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "simdist.cli", "calibrate", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_without_a_gpu_exits_2_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    p = _cli(["--quick", "--out", str(tmp_path / "c.parquet")], tmp_path)
    assert p.returncode == 2
    assert p.stderr == NO_GPU_MESSAGE + "\n" and p.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written
    p = _cli(["--gpu", "h999"], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--gpu" in p.stderr and "h200" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_calibrate_command_in_process_without_a_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibrate_command(None, "h200", True) == 2
    assert capsys.readouterr().err == NO_GPU_MESSAGE + "\n"


# ------------------------------------------------------------------ cluster.calibration


def _table(tmp_path: Path, gpu: str = "h100-sxm", name: str = "cal.parquet", **values) -> Path:
    values = values or {"gemm_ceiling": 0.7}
    keys = list(values)
    path = tmp_path / name
    table = pa.table({"gpu": [gpu] * len(keys), "key": keys, "value": list(values.values()),
                      "source": ["measured"] * len(keys)}, schema=CALIBRATION_SCHEMA)
    if path.suffix == ".parquet":  # bad rows too: Calibration.write would check them
        pq.write_table(table, path)
    else:
        Calibration.from_table(table).write(path)
    return path


def test_cluster_calibration_default_null_gives_the_defaults():
    cfg = load_config({})
    assert cfg.cluster.calibration is None
    assert calibration_for(cfg) is DEFAULT


def test_cluster_calibration_loads_the_table(tmp_path):
    path = _table(tmp_path, gemm_ceiling=0.7, hbm_fraction=0.9)
    cfg = load_config({"cluster": {"gpu": "h100-sxm", "calibration": str(path)}})
    assert Path(cfg.cluster.calibration).is_absolute()
    cal = calibration_for(cfg)
    assert cal.gemm_ceiling("h100-sxm") == 0.7 and cal.hbm_fraction("h100-sxm") == 0.9
    assert cal.sm_count("h100-sxm") == 132  # defaults under it
    assert calibration_for(cfg) is cal  # loaded once
    over = load_config({}, [f"cluster.calibration={path}"])  # --set works too
    assert calibration_for(over).gemm_ceiling("h100-sxm") == 0.7
    star = _table(tmp_path, gpu="*", name="star.arrow", launch_floor_s=3e-6)
    cfg = load_config({"cluster": {"gpu": "b200", "calibration": str(star)}})
    assert calibration_for(cfg).launch_floor_s("b200") == 3e-6


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.parquet", ["file not found", "missing.parquet"]),
    (lambda d: d, ["is not a file"]),
    (lambda d: (d / "junk.parquet").write_text("not a table") and d / "junk.parquet",
     ["cannot read calibration table"]),
    (lambda d: _table(d, gemm_ceilng=0.7), ["gemm_ceilng"]),
    (lambda d: _table(d, hbm_fraction=1.5), ["hbm_fraction", "0 < v <= 1"]),
    (lambda d: _table(d, gpu="h200"), ["rows for GPU h200 only", "h100-sxm"]),
])
def test_cluster_calibration_bad_files_name_the_key(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config({"cluster": {"gpu": "h100-sxm", "calibration": str(path)}})
    assert e.value.key == "cluster.calibration"
    for w in words:
        assert w in e.value.message
    assert "\n" not in str(e.value)


def _fake_gpu(monkeypatch, meas: dict) -> None:
    """The command's path after measuring, on a CPU: a fake device and fixed measurements."""
    import torch

    import simdist.calibrate as c

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(c, "measure", lambda preset, quick: meas)
    monkeypatch.setattr(c, "_device_info", lambda: {"name": "NVIDIA H200", "device_count": 8,
                                                    "torch": torch.__version__})


def test_calibrate_command_writes_the_table_and_the_sidecar(tmp_path, monkeypatch, capsys):
    meas, _ = _kernel_meas(True)
    meas.update(_coll_meas(H200, COLL_TRUTH, 8, sizes=collective_sizes(True)))
    _fake_gpu(monkeypatch, meas)
    out = tmp_path / "sub" / "h200.parquet"
    assert calibrate_command(str(out), None, True) == 0
    printed = capsys.readouterr().out
    assert "gemm_ceiling" in printed and "0.71" in printed and "0.8" in printed  # next to default
    cal = load_calibration(out)
    assert cal.gemm_ceiling("h200") == pytest.approx(0.71)
    assert cal.nccl_latency_scale("h200") == pytest.approx(2.1)
    src = cal.source("gemm_ceiling", "h200")
    assert src.startswith("measured by simdist calibrate on NVIDIA H200, torch ")
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["gpu"] == "h200" and side["fitted"]["gemm_ceiling"] == pytest.approx(0.71)
    assert side["defaults"]["gemm_ceiling"] == 0.80
    assert len(side["measurements"]["kernels"]) == len(meas["kernels"])
    assert max(abs(c["rel_err"]) for c in side["check"]) < 1e-6
    assert sorted(p.name for p in out.parent.iterdir()) == ["h200.json", "h200.parquet"]
    # a config can use it at once
    cfg = load_config({"cluster": {"gpu": "h200", "calibration": str(out)}})
    assert calibration_for(cfg).attn_efficiency("h200", True) == pytest.approx(0.47)
    # running again replaces its own table
    assert calibrate_command(str(out), None, True) == 0


def test_calibrate_command_refuses_to_replace_other_files(tmp_path, monkeypatch, capsys):
    _fake_gpu(monkeypatch, {"kernels": []})
    other = tmp_path / "notes.parquet"
    other.write_text("mine")
    assert calibrate_command(str(other), None, True) == 2
    assert other.read_text() == "mine"
    assert "not a calibration table" in capsys.readouterr().err
    assert calibrate_command(str(tmp_path / "t.json"), None, True) == 2


def test_calibrate_command_unknown_device_needs_gpu(tmp_path, monkeypatch, capsys):
    import torch

    _fake_gpu(monkeypatch, {"kernels": []})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA L40S")
    assert calibrate_command(str(tmp_path / "t.parquet"), None, True) == 2
    err = capsys.readouterr().err
    assert "'NVIDIA L40S'" in err and "--gpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.parquet").exists()


def test_measuring_loop_runs_on_meta_with_a_fake_clock(monkeypatch):
    """The measuring code path (cases, row description, timing loop, spin-ahead sizing) with
    torch.cuda's events replaced by a clock that says every call takes 2 us: a smoke test of
    the code a GPU session runs, not of its numbers."""
    import torch

    import simdist.calibrate as c

    class Event:
        clock = [0.0]

        def __init__(self, enable_timing=True):  # noqa: ANN001
            self.t = 0.0

        def record(self):
            Event.clock[0] += 1e-9
            self.t = Event.clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, other):  # ms
            return (other.t - self.t) * 1e3

    calls = {"dt": 0.0}

    def timed(fn):  # every call advances the fake GPU clock by dt
        def call(*a, **k):
            Event.clock[0] += calls["dt"]
            return fn(*a, **k)
        return call

    def build_meta(kind, params, device):  # noqa: ANN001
        calls["dt"] = 2e-6 if kind == "tiny_add" else 1e-3  # short (spin ahead) and long calls
        return build(kind, params, "meta")

    build, time_cuda = c._build, c._time_cuda
    monkeypatch.setattr(c, "_build", build_meta)
    monkeypatch.setattr(c, "_time_cuda", lambda fn, *a, **k: time_cuda(timed(fn), *a, **k))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    for name in ("synchronize", "empty_cache", "_sleep"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    cases = kernel_cases(True, 132, (128, 256))
    rows = c._measure_kernels(cases, True, lambda line: None)
    assert [r["role"] for r in rows] == [role for role, _, _ in cases]
    for r in rows:
        short = r["case"] == "tiny_add"
        assert r["time_s"] == pytest.approx(2e-6 if short else 1e-3, rel=1e-3)
        assert r["reps"] in ((10000,) if short else (49, 50))  # 0.05 s / 1 ms
        assert len(r["trial_means_s"]) == (4 if short else 3) and r["host_bound"] in (True, False)
    json.dumps(rows)
