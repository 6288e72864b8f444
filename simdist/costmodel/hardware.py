"""GPU hardware specs and presets for the time model.

Units are SI throughout: FLOP/s, bytes, bytes/s. Vendors quote memory in GB = 1e9 bytes
(an "80 GB" H100 has 80e9 bytes of HBM, not 80 GiB), and so do we.

Where the numbers come from
---------------------------
* Dense (no sparsity) tensor-core BF16/FP8 peaks, HBM size and bandwidth, NVLink: the
  hardware table in /work/shared/VALIDATION.md, which follows the vendor datasheets
  (NVIDIA A100/H100/H200/HGX B200, AMD MI300X). V100 is not in that table: NVIDIA V100 SXM2
  32 GB datasheet (125 TF/s fp16 tensor core, 0.9 TB/s HBM2, NVLink 300 GB/s bidirectional).
* NVLink in the table is the datasheet *bidirectional* aggregate per GPU (A100 600 GB/s,
  H100 900 GB/s, ...). A ring collective pushes data in one direction per link, so
  ``nvlink_bw`` is half of it (A100 300e9, H100 450e9, B200 900e9). MI300X: 896 GB/s is the
  aggregate bidirectional Infinity Fabric bandwidth (7 links x 64 GB/s x 2), so 448e9.
* fp32 peaks are the non-tensor-core (CUDA core / vector) figures from the same datasheets:
  V100 15.7, A100 19.5, H100 67, H200 67, B200 80, MI300X 163.4 TF/s. We do not model TF32:
  PyTorch leaves TF32 matmuls off by default.
* Inter-node bandwidth is per GPU, one NIC per GPU: V100 100 Gb/s EDR IB = 12.5e9 B/s; A100
  200 Gb/s HDR (Selene, the Megatron calibration cluster) = 25e9; H100/H200/B200/MI300X
  400 Gb/s NDR / 400 GbE = 50e9 (VALIDATION.md).

Efficiency factors (one global factor each) -- read only by `simdist search`'s analytical prior,
which orders candidate plans; step times come from the calibration table (calibration.py)
-------------------------------------------------------------------------------------------
* ``matmul_efficiency`` 0.75: VALIDATION.md reports large bf16 GEMMs reach about 70-80 % of
  peak on H100; we take the middle. Small or skinny GEMMs do much worse; a realistic model
  needs per-shape curves (future work).
* ``memory_efficiency`` 0.8: achievable streaming bandwidth of HBM (STREAM-like copy
  kernels) is typically 80-90 % of the datasheet; 0.8 is the conservative end. This one is
  our assumption, not from VALIDATION.md.
* ``link_efficiency`` 0.8: VALIDATION.md reports measured NVLink at about 83 % of the
  datasheet figure; we round down and use the same factor for the inter-node NIC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

__all__ = ["GPUSpec", "PRESETS", "UnknownGPU", "InvalidGPUSpec", "gpu_spec"]

TERA = 1e12
GIGA = 1e9

# dtype names accepted by GPUSpec.flops_for (short names and torch dtype names).
_BF16_NAMES = {"bf16", "fp16", "bfloat16", "float16", "half"}
_FP32_NAMES = {"fp32", "float32", "float"}
_FP8_NAMES = {"fp8", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_flops: float  # FLOP/s, dense tensor-core bf16 (fp16 for V100, which has no bf16)
    fp8_flops: float | None  # FLOP/s, dense; None where the GPU has no fp8 tensor cores
    fp32_flops: float  # FLOP/s, non-tensor-core fp32
    hbm_bytes: int  # bytes (GB = 1e9)
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s per GPU, unidirectional
    internode_bw: float  # bytes/s per GPU (its NIC), unidirectional
    matmul_efficiency: float = 0.75
    memory_efficiency: float = 0.8
    link_efficiency: float = 0.8

    def __post_init__(self) -> None:
        for field in ("bf16_flops", "fp32_flops", "hbm_bw", "nvlink_bw", "internode_bw"):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidGPUSpec(f"GPU spec {self.name!r}: {field} must be a positive number, got {v!r}")
        if self.fp8_flops is not None and not self.fp8_flops > 0:
            raise InvalidGPUSpec(f"GPU spec {self.name!r}: fp8_flops must be positive or None, got {self.fp8_flops!r}")
        if not (isinstance(self.hbm_bytes, int) and self.hbm_bytes > 0):
            raise InvalidGPUSpec(f"GPU spec {self.name!r}: hbm_bytes must be a positive int, got {self.hbm_bytes!r}")
        for field in ("matmul_efficiency", "memory_efficiency", "link_efficiency"):
            v = getattr(self, field)
            if not 0 < v <= 1:
                raise InvalidGPUSpec(f"GPU spec {self.name!r}: {field} must be in (0, 1], got {v!r}")

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in ``dtype`` ("bf16"/"fp16" -> bf16 peak, "fp32", "fp8")."""
        d = str(dtype).lower().removeprefix("torch.")
        if d in _BF16_NAMES:
            return self.bf16_flops
        if d in _FP32_NAMES:
            return self.fp32_flops
        if d in _FP8_NAMES:
            if self.fp8_flops is None:
                raise ValueError(f"GPU {self.name!r} has no fp8 tensor cores (dtype {dtype!r})")
            return self.fp8_flops
        raise ValueError(f"unknown dtype {dtype!r}; expected one of bf16, fp16, fp32, fp8")


def _u(value: float, unit: float) -> float:
    """Vendor units -> SI, rounded to whole FLOP/s or bytes/s (2.039 * 1e12 is not 2.039e12)."""
    return float(round(float(value) * unit))


def _preset(name, bf16_tf, fp8_tf, fp32_tf, hbm_gb, hbm_tb_s, nvlink_bi_gb_s, internode_gb_s):
    return GPUSpec(
        name=name,
        bf16_flops=_u(bf16_tf, TERA),
        fp8_flops=None if fp8_tf is None else _u(fp8_tf, TERA),
        fp32_flops=_u(fp32_tf, TERA),
        hbm_bytes=int(_u(hbm_gb, GIGA)),
        hbm_bw=_u(hbm_tb_s, TERA),
        nvlink_bw=_u(nvlink_bi_gb_s / 2, GIGA),  # datasheet bidirectional -> unidirectional
        internode_bw=_u(internode_gb_s, GIGA),
    )


# name: bf16 TF/s, fp8 TF/s, fp32 TF/s, HBM GB, HBM TB/s, NVLink GB/s (bidirectional), NIC GB/s
PRESETS: dict[str, GPUSpec] = {
    p.name: p
    for p in (
        _preset("v100-32gb", 125, None, 15.7, 32, 0.9, 300, 12.5),  # bf16 slot = fp16 tensor core
        _preset("a100-40gb", 312, None, 19.5, 40, 1.555, 600, 25),
        _preset("a100-80gb", 312, None, 19.5, 80, 2.039, 600, 25),
        _preset("h100-sxm", 989, 1979, 67, 80, 3.35, 900, 50),
        _preset("h200", 989, 1979, 67, 141, 4.8, 900, 50),
        _preset("b200", 2250, 4500, 80, 180, 8.0, 1800, 50),
        _preset("mi300x", 1307, 2615, 163.4, 192, 5.3, 896, 50),  # Infinity Fabric, not NVLink
    )
}


class UnknownGPU(KeyError):
    """Raised for a GPU preset name that is not in PRESETS."""

    def __init__(self, name: str, allowed: list[str] | tuple[str, ...]):
        super().__init__(name)
        self.name = name
        self.allowed = list(allowed)

    def __str__(self) -> str:
        return f"unknown GPU preset {self.name!r}; allowed: {', '.join(self.allowed)}"


class InvalidGPUSpec(ValueError):
    """Raised for a custom GPU mapping with missing, unknown or bad keys."""


_REQUIRED_KEYS = ("name", "bf16_tflops", "hbm_gb", "hbm_tb_s", "nvlink_gb_s", "internode_gb_s")
_OPTIONAL_KEYS = ("fp8_tflops", "fp32_tflops", "matmul_efficiency", "memory_efficiency", "link_efficiency")
# fp32 peak when a custom spec does not give one: A100 312/19.5 = 16, H100 989/67 = 14.8;
# dividing the bf16 peak by 16 is the usual datacenter ratio (B200 is ~28, MI300X ~8).
_DEFAULT_BF16_TO_FP32 = 16.0


def gpu_spec(gpu: str | Mapping | GPUSpec) -> GPUSpec:
    """A preset by name, or a custom spec from a mapping.

    Mapping keys (vendor units): ``name``, ``bf16_tflops``, ``hbm_gb``, ``hbm_tb_s``,
    ``nvlink_gb_s`` (per GPU, *unidirectional*, like ``GPUSpec.nvlink_bw``),
    ``internode_gb_s`` (per GPU); optional ``fp8_tflops``, ``fp32_tflops`` (default
    bf16/16), ``matmul_efficiency``, ``memory_efficiency``, ``link_efficiency``.
    """
    if isinstance(gpu, GPUSpec):
        return gpu
    if isinstance(gpu, str):
        try:
            return PRESETS[gpu]
        except KeyError:
            raise UnknownGPU(gpu, sorted(PRESETS)) from None
    if not isinstance(gpu, Mapping):
        raise InvalidGPUSpec(f"GPU must be a preset name or a mapping, got {type(gpu).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in gpu]
    unknown = [k for k in gpu if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(map(str, unknown))}")
        raise InvalidGPUSpec(
            f"custom GPU spec: {'; '.join(parts)}. Required keys: {', '.join(_REQUIRED_KEYS)}; "
            f"optional: {', '.join(_OPTIONAL_KEYS)}"
        )
    try:
        bf16 = _u(gpu["bf16_tflops"], TERA)
        fp8 = gpu.get("fp8_tflops")
        fp32 = gpu.get("fp32_tflops")
        effs = {k: float(gpu[k]) for k in ("matmul_efficiency", "memory_efficiency", "link_efficiency") if k in gpu}
        return GPUSpec(
            name=str(gpu["name"]),
            bf16_flops=bf16,
            fp8_flops=None if fp8 is None else _u(fp8, TERA),
            fp32_flops=bf16 / _DEFAULT_BF16_TO_FP32 if fp32 is None else _u(fp32, TERA),
            hbm_bytes=int(_u(gpu["hbm_gb"], GIGA)),
            hbm_bw=_u(gpu["hbm_tb_s"], TERA),
            nvlink_bw=_u(gpu["nvlink_gb_s"], GIGA),
            internode_bw=_u(gpu["internode_gb_s"], GIGA),
            **effs,
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, InvalidGPUSpec):
            raise
        raise InvalidGPUSpec(f"custom GPU spec {gpu.get('name')!r}: {e}") from None
