"""Unit tests for simdist.costmodel: presets, custom GPU specs, MFU, the library boundary."""

from __future__ import annotations

import ast
import pathlib

import pytest

from simdist.costmodel import (
    PRESETS,
    GPUSpec,
    InvalidGPUSpec,
    UnknownGPU,
    gpu_spec,
    mfu,
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
