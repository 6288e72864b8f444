"""Unit tests for simdist.costmodel: presets, roofline, ring collectives, MFU."""

from __future__ import annotations

import ast
import pathlib

import pytest

from simdist.costmodel import (
    COLLECTIVE_KINDS,
    KERNEL_LAUNCH_FLOOR_S,
    PRESETS,
    GPUSpec,
    InvalidGPUSpec,
    UnknownGPU,
    collective_time,
    gpu_spec,
    group_link_bw,
    mfu,
    op_time,
    op_times,
)

approx = lambda x: pytest.approx(x, rel=1e-12)  # noqa: E731

# ---------------------------------------------------------------- hardware

# VALIDATION.md hardware table (+ V100 from the brief): name -> (bf16, fp8, HBM bytes,
# HBM B/s, NVLink bidirectional B/s); fp32 and NIC from the datasheets.
TABLE = {
    "v100-32gb": (125e12, None, 32e9, 0.9e12, 300e9, 15.7e12, 12.5e9),
    "a100-40gb": (312e12, None, 40e9, 1.555e12, 600e9, 19.5e12, 25e9),
    "a100-80gb": (312e12, None, 80e9, 2.039e12, 600e9, 19.5e12, 25e9),
    "h100-sxm": (989e12, 1979e12, 80e9, 3.35e12, 900e9, 67e12, 50e9),
    "h200": (989e12, 1979e12, 141e9, 4.8e12, 900e9, 67e12, 50e9),
    "b200": (2250e12, 4500e12, 180e9, 8.0e12, 1800e9, 80e12, 50e9),
    "mi300x": (1307e12, 2615e12, 192e9, 5.3e12, 896e9, 163.4e12, 50e9),
}


def test_preset_names():
    assert set(PRESETS) == set(TABLE)
    for name, spec in PRESETS.items():
        assert spec.name == name
        assert gpu_spec(name) is spec


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_match_validation_table(name):
    bf16, fp8, hbm, hbm_bw, nvlink_bi, fp32, nic = TABLE[name]
    s = PRESETS[name]
    assert s.bf16_flops == approx(bf16)
    assert s.fp8_flops == (None if fp8 is None else approx(fp8))
    assert s.fp32_flops == approx(fp32)
    assert isinstance(s.hbm_bytes, int) and s.hbm_bytes == int(hbm)  # GB = 1e9, as vendors
    assert s.hbm_bw == approx(hbm_bw)
    assert s.nvlink_bw == approx(nvlink_bi / 2)  # unidirectional
    assert s.internode_bw == approx(nic)


def test_spot_values():
    h100 = PRESETS["h100-sxm"]
    assert h100.bf16_flops == 989e12
    assert h100.hbm_bytes == 80_000_000_000
    assert h100.nvlink_bw == approx(450e9)
    assert PRESETS["a100-80gb"].hbm_bw == 2.039e12  # exact, not 2039000000000.0002
    assert PRESETS["a100-80gb"].nvlink_bw == approx(300e9)
    assert (h100.matmul_efficiency, h100.memory_efficiency, h100.link_efficiency) == (0.75, 0.8, 0.8)


def test_flops_for():
    h100 = PRESETS["h100-sxm"]
    assert h100.flops_for("bf16") == h100.flops_for("fp16") == 989e12
    assert h100.flops_for("torch.bfloat16") == 989e12
    assert h100.flops_for("fp32") == approx(67e12)
    assert h100.flops_for("fp8") == approx(1979e12)
    with pytest.raises(ValueError, match="fp8"):
        PRESETS["a100-80gb"].flops_for("fp8")
    with pytest.raises(ValueError, match="unknown dtype"):
        h100.flops_for("int4")


def test_spec_frozen():
    with pytest.raises(Exception):
        PRESETS["h100-sxm"].bf16_flops = 1.0  # type: ignore[misc]


def test_unknown_preset_lists_allowed_names():
    with pytest.raises(UnknownGPU) as ei:
        gpu_spec("h100-pcie")
    e = ei.value
    assert isinstance(e, KeyError)
    assert e.name == "h100-pcie"
    assert e.allowed == sorted(PRESETS)
    msg = str(e)
    assert "h100-pcie" in msg
    for name in PRESETS:
        assert name in msg


def test_custom_mapping_spec():
    s = gpu_spec(
        {"name": "mygpu", "bf16_tflops": 500, "hbm_gb": 96, "hbm_tb_s": 4.0, "nvlink_gb_s": 400,
         "internode_gb_s": 50, "fp8_tflops": 1000}
    )
    assert isinstance(s, GPUSpec) and s.name == "mygpu"
    assert s.bf16_flops == approx(500e12)
    assert s.fp8_flops == approx(1000e12)
    assert s.hbm_bytes == 96_000_000_000
    assert s.hbm_bw == approx(4e12)
    assert s.nvlink_bw == approx(400e9)  # mapping value is already unidirectional
    assert s.internode_bw == approx(50e9)
    assert s.fp32_flops == approx(500e12 / 16)  # documented default
    assert s.matmul_efficiency == 0.75


def test_custom_mapping_optional_keys():
    s = gpu_spec(
        {"name": "x", "bf16_tflops": 100, "hbm_gb": 16, "hbm_tb_s": 1, "nvlink_gb_s": 100,
         "internode_gb_s": 10, "fp32_tflops": 20, "matmul_efficiency": 0.5}
    )
    assert s.fp8_flops is None
    assert s.fp32_flops == approx(20e12)
    assert s.matmul_efficiency == 0.5


def test_custom_mapping_errors():
    with pytest.raises(InvalidGPUSpec, match="missing hbm_gb"):
        gpu_spec({"name": "x", "bf16_tflops": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1, "internode_gb_s": 1})
    with pytest.raises(InvalidGPUSpec, match="unknown tflops"):
        gpu_spec({"name": "x", "bf16_tflops": 1, "hbm_gb": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1,
                  "internode_gb_s": 1, "tflops": 3})
    with pytest.raises(InvalidGPUSpec, match="bf16_flops"):
        gpu_spec({"name": "x", "bf16_tflops": -1, "hbm_gb": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1,
                  "internode_gb_s": 1})
    with pytest.raises(InvalidGPUSpec):
        gpu_spec({"name": "x", "bf16_tflops": "fast", "hbm_gb": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1,
                  "internode_gb_s": 1})


# ---------------------------------------------------------------- roofline

H100 = PRESETS["h100-sxm"]


def test_roofline_compute_bound_matmul():
    # 8192^3 bf16 GEMM: 2*8192^3 FLOPs, 3 * 8192^2 * 2 bytes -> arithmetic intensity ~2700
    n = 8192
    flops, nbytes = 2 * n**3, 3 * n * n * 2
    t = op_time(flops, nbytes, H100)
    assert t == approx(flops / (989e12 * 0.75))
    assert t > nbytes / (3.35e12 * 0.8)


def test_roofline_memory_bound():
    # elementwise add of 1 Gi bf16 elements: 2 reads + 1 write
    n = 2**30
    flops, nbytes = n, 3 * n * 2
    t = op_time(flops, nbytes, H100, is_matmul=False)
    assert t == approx(nbytes / (3.35e12 * 0.8))
    # a skinny matmul (GEMV) is memory-bound too
    m = 8192
    t_gemv = op_time(2 * m * m, m * m * 2, H100)
    assert t_gemv == approx(m * m * 2 / (3.35e12 * 0.8))


def test_roofline_non_matmul_uses_fp32_peak_when_binding():
    # flop-dense pointwise op with few bytes: bound by the vector fp32 peak, no efficiency factor
    t = op_time(1e12, 1e3, H100, is_matmul=False)
    assert t == approx(1e12 / 67e12)


def test_roofline_dtype_and_floor():
    flops = 2 * 8192**3
    assert op_time(flops, 0, H100, dtype="fp8") == approx(flops / (1979e12 * 0.75))
    assert op_time(flops, 0, H100, dtype="fp32") == approx(flops / (67e12 * 0.75))
    assert op_time(10, 10, H100) == KERNEL_LAUNCH_FLOOR_S == 2e-6
    assert op_time(0, 0, H100) == 0.0  # views launch nothing
    with pytest.raises(ValueError):
        op_time(-1, 0, H100)


def test_op_times_matches_scalar():
    flops = [2 * 8192**3, 2**30, 1e12, 10, 0, 2 * 8192**2]
    nbytes = [3 * 8192**2 * 2, 6 * 2**30, 1e3, 10, 0, 8192**2 * 2]
    mm = [True, False, False, True, False, True]
    got = op_times(flops, nbytes, mm, H100, "bf16")
    assert isinstance(got, list) and len(got) == len(flops)
    assert got == [approx(op_time(f, b, H100, "bf16", m)) for f, b, m in zip(flops, nbytes, mm)]
    dts = ["bf16", "fp8", "fp8", "fp32", "bf16", "fp32"]
    got = op_times(flops, nbytes, mm, H100, dts)
    assert got == [approx(op_time(f, b, H100, d, m)) for f, b, m, d in zip(flops, nbytes, mm, dts)]
    assert op_times([], [], [], H100) == []
    with pytest.raises(ValueError):
        op_times([1, 2], [1], [True, True], H100)


# ---------------------------------------------------------------- collectives

LAT = 5e-6


def test_all_reduce_hand_example():
    # 1 GB on 8 GPUs at 100 GB/s: ring moves 2*7/8 GB per GPU; 2*(n-1) latency steps
    t = collective_time("all_reduce", 1e9, 8, 100e9)
    assert t == approx(2 * 7 / 8 * 1e9 / 1e11 + 14 * LAT)
    assert t == approx(0.0175 + 7e-5)


def test_ring_formulas():
    nb, n, bw = 4e9, 4, 50e9
    assert collective_time("all_gather", nb, n, bw) == approx(3 / 4 * nb / bw + 3 * LAT)
    assert collective_time("reduce_scatter", nb, n, bw) == approx(3 / 4 * nb / bw + 3 * LAT)
    assert collective_time("all_to_all", nb, n, bw) == approx(3 / 4 * nb / bw + 3 * LAT)
    assert collective_time("broadcast", nb, n, bw) == approx(nb / bw + 3 * LAT)
    assert collective_time("send", nb, 2, bw) == approx(nb / bw + LAT)
    assert collective_time("recv", nb, 2, bw) == approx(nb / bw + LAT)
    # AR = RS + AG
    assert collective_time("all_reduce", nb, n, bw) == approx(
        collective_time("reduce_scatter", nb, n, bw) + collective_time("all_gather", nb, n, bw)
    )
    assert collective_time("all_gather", nb, n, bw, latency_s=0) == approx(3 / 4 * nb / bw)


def test_collective_edge_cases():
    for kind in COLLECTIVE_KINDS:
        assert collective_time(kind, 1e9, 1, 1e9) == 0.0
    with pytest.raises(ValueError, match="unknown collective"):
        collective_time("allgather_v", 1e9, 8, 1e9)
    with pytest.raises(ValueError):
        collective_time("all_gather", 1e9, 0, 1e9)
    with pytest.raises(ValueError):
        collective_time("all_gather", 1e9, 8, 0)


def test_group_link_bw():
    h = PRESETS["h100-sxm"]
    assert group_link_bw(h, range(8), 8) == approx(450e9 * 0.8)
    assert group_link_bw(h, [8, 9, 15], 8) == approx(450e9 * 0.8)
    assert group_link_bw(h, [7, 8], 8) == approx(50e9 * 0.8)
    assert group_link_bw(h, [0, 8, 16, 24], 8) == approx(50e9 * 0.8)
    assert group_link_bw(PRESETS["a100-80gb"], [0, 8], 8) == approx(25e9 * 0.8)
    with pytest.raises(ValueError):
        group_link_bw(h, [], 8)
    with pytest.raises(ValueError):
        group_link_bw(h, [0, 1], 0)


# ---------------------------------------------------------------- utilisation

def test_mfu():
    # 64 GPUs, 312 TF/s, 1 s step, 64 * 156e12 model FLOPs -> 50 %
    assert mfu(64 * 156e12, 64, 1.0, 312e12) == approx(0.5)
    assert mfu(6e15, 8, 2.0, 989e12) == approx(6e15 / (8 * 2.0 * 989e12))
    with pytest.raises(ValueError):
        mfu(1.0, 8, 0.0, 1e12)


def test_costmodel_imports_no_other_simdist_module():
    pkg = pathlib.Path(__file__).resolve().parents[1] / "simdist" / "costmodel"
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simdist"):
                assert node.module.startswith("simdist.costmodel"), f"{f.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("simdist") or a.name.startswith("simdist.costmodel")
