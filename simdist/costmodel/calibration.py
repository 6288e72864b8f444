"""The one calibration table of the time model: every constant, per GPU, with its citation.

Rows are (gpu, key, value, source). ``gpu`` is a preset name (``hardware.PRESETS``) or ``*``,
the value for every GPU without its own row. A key names one constant; keys with a link
level or an algorithm carry it after a dot (``comm_slowdown.nvlink``,
``nccl_hop_latency_s.net.ring.simple``). Every number is a physical quantity or a published
constant; nothing here is a knob to fit a run. `simdist calibrate` writes the same schema
from measurements; ``load_calibration`` reads it, keeping the defaults for missing keys.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

import pyarrow as pa

__all__ = [
    "ALGORITHMS", "CALIBRATION_SCHEMA", "Calibration", "LEVELS", "PROTOCOLS",
    "default_calibration", "load_calibration",
]

CALIBRATION_SCHEMA = pa.schema([
    ("gpu", pa.string()), ("key", pa.string()), ("value", pa.float64()), ("source", pa.string()),
])

LEVELS = ("nvlink", "net")  # inside one node / across nodes
ALGORITHMS = ("ring", "tree", "nvls")
PROTOCOLS = ("ll", "ll128", "simple")

_VAL = "VALIDATION.md"
_TUNING = "NVIDIA/nccl src/graph/tuning.cc (ncclTunerConstantsDefaults / ncclTopoTuneModel)"
_MTA = ("pytorch aten/src/ATen/native/cuda/MultiTensorApply.cuh, CUDA < 13 build "
        "(4 KiB kernel arguments; CUDA >= 13 builds use 770/448/336/252/210 tensors, 2240 blocks)")


def _rows() -> list[tuple[str, str, float, str]]:
    r: list[tuple[str, str, float, str]] = []

    def add(gpu: str, key: str, value: float, source: str) -> None:
        r.append((gpu, key, float(value), source))

    # --- GEMM ----------------------------------------------------------------------------
    mamf = f"{_VAL} 'largest achievable BF16 GEMM' (max-achievable-matmul)"
    add("a100-40gb", "gemm_ceiling", 0.86, f"{mamf}: A100 SXM 268 of 312 TF/s")
    add("a100-80gb", "gemm_ceiling", 0.86, f"{mamf}: A100 SXM 268 of 312 TF/s")
    add("h100-sxm", "gemm_ceiling", 0.80, f"{mamf}: H100 SXM 792 of 989 TF/s")
    add("h200", "gemm_ceiling", 0.80, f"{mamf}: H100 SXM 792 of 989 TF/s (same GH100 die and clocks)")
    add("b200", "gemm_ceiling", 0.78, f"{mamf}: B200 1745 of 2250 TF/s")
    add("*", "gemm_ceiling", 0.80, f"assumption: no published ceiling for this GPU in {_VAL}; "
        "the H100 figure until `simdist calibrate` measures it")
    add("v100-32gb", "sm_count", 80, "NVIDIA V100 whitepaper: 80 SMs (GV100 SXM2)")
    for g in ("a100-40gb", "a100-80gb"):
        add(g, "sm_count", 108, f"{_VAL}; NVIDIA A100 whitepaper: 108 SMs")
    for g in ("h100-sxm", "h200"):
        add(g, "sm_count", 132, f"{_VAL}; NVIDIA H100 whitepaper: 132 SMs (SXM5)")
    add("b200", "sm_count", 148, "NVIDIA Blackwell B200: 148 SMs (2 dies x 74)")
    add("mi300x", "sm_count", 304, "AMD CDNA3 whitepaper: MI300X 304 compute units")
    add("*", "sm_count", 132, "assumption: H100 SM count for a GPU without its own row")
    tile = ("CUTLASS default bf16 tensor-op tile 128x256 (sm80 3-stage, sm90 warp-specialized "
            "128x256x64) and the tile cuBLAS heuristics pick for large GEMMs")
    add("*", "gemm_tile_m", 128, tile)
    add("*", "gemm_tile_n", 256, tile)
    add("*", "gemm_splitk_min_k", 256, "CUTLASS split-K (splitk_gemm examples, GemmSplitKParallel) "
        "and cuBLAS heuristics split K only into slices of several k-tiles; 4 k-tiles of 64")
    add("mi300x", "gemm_tile_m", 256, "hipBLASLt/Tensile macro tile MT256x256 for large bf16 GEMMs")
    add("mi300x", "gemm_tile_n", 256, "hipBLASLt/Tensile macro tile MT256x256 for large bf16 GEMMs")

    # --- attention -----------------------------------------------------------------------
    simumax = f"{_VAL} (SimuMax starter tables, H100): flash fwd 0.72, bwd 0.55 of peak"
    for g in ("h100-sxm", "h200"):
        add(g, "attn_fwd_efficiency", 0.72, simumax)
        add(g, "attn_bwd_efficiency", 0.55, simumax)
    fa2 = "Dao 2023, FlashAttention-2 (arXiv 2307.08691) on A100: up to 73% of peak fwd, 63% bwd"
    for g in ("a100-40gb", "a100-80gb"):
        add(g, "attn_fwd_efficiency", 0.73, fa2)
        add(g, "attn_bwd_efficiency", 0.63, fa2)
    add("*", "attn_fwd_efficiency", 0.72, f"assumption: the H100 figure ({simumax}); no public "
        "fraction for this GPU in " + _VAL)
    add("*", "attn_bwd_efficiency", 0.55, f"assumption: the H100 figure ({simumax})")

    # --- memory-bound kernels --------------------------------------------------------------
    add("*", "hbm_fraction", 0.80, "STREAM-like copy kernels reach 80-90% of datasheet HBM "
        "bandwidth (BabelStream on A100/H100); the conservative end, as hardware.py")
    add("*", "launch_floor_s", 2e-6, "minimum duration of a CUDA kernel in a launched stream "
        "(2-5 us host launch, pipelined behind running kernels); the low end")
    add("*", "foreach_chunk_elems", 65536, f"{_MTA}: kChunkSize")
    add("*", "foreach_max_blocks", 320, f"{_MTA}: depth_to_max_blocks")
    for depth, n in zip(range(1, 6), (110, 64, 48, 36, 30)):
        add("*", f"foreach_max_tensors.d{depth}", n, f"{_MTA}: depth_to_max_tensors[{depth - 1}]")

    # --- NCCL latency (microseconds in tuning.cc, seconds here) ---------------------------
    base = {("tree", "ll"): 6.8, ("tree", "ll128"): 14.0, ("tree", "simple"): 8.4,
            ("ring", "ll"): 6.6, ("ring", "ll128"): 14.0, ("ring", "simple"): 8.4,
            ("nvls", "simple"): 0.0}
    for (a, p), us in base.items():
        add("*", f"nccl_base_latency_s.{a}.{p}", us * 1e-6, f"{_TUNING}: baseLatencies {a}/{p}")
    hops = {
        ("nvlink", "tree"): (0.6, 1.25, 4.0), ("nvlink", "ring"): (0.6, 1.9, 3.4),
        ("nvlink", "nvls"): (None, None, 25.0),
        ("net", "tree"): (5.0, 8.5, 14.0), ("net", "ring"): (2.7, 4.0, 14.0),
        ("net", "nvls"): (None, None, 18.0),
    }
    for (lvl, a), us3 in hops.items():
        hw = "NVLINK" if lvl == "nvlink" else "NET"
        for p, us in zip(PROTOCOLS, us3):
            if us is not None:
                add("*", f"nccl_hop_latency_s.{lvl}.{a}.{p}", us * 1e-6,
                    f"{_TUNING}: hwLatencies {hw} {a}/{p}")
    add("*", "nccl_ring_plateau", 1.4, f"{_TUNING} ncclTopoGetAlgoTime: ring/Simple all-reduce "
        "across nodes, latency x1.4 ('plateau effect of ring', sm80+)")
    add("*", "nccl_latency_scale", 2.65, f"{_VAL}: 8x H200 NCCL 2.27 all-reduce, 32 KiB at 1.44 "
        "GB/s busbw = 39.8 us end to end (256 KiB: 39.2 us), against 15.0 us in the tuner's "
        "model (ring LL: 6.6 + 14 x 0.6 us): the tuner's latencies rank algorithms, measured "
        "collectives take 2.65x longer (kernel launch, peer handshakes)")

    # --- NCCL bandwidth -------------------------------------------------------------------
    add("*", "ring_busbw_fraction.nvlink", 0.82, f"{_VAL}: 8x H200 ring all-reduce without "
        "NVLS tops out near 368 GB/s busbw = 0.82 of the 450 GB/s line rate; ring all-gather / "
        "reduce-scatter about 370; B200 1 node 741 of 900 GB/s")
    add("*", "ring_busbw_fraction.net", 0.94, f"{_VAL}: 4 nodes of 8x B200, all-reduce 377 GB/s "
        "busbw at 4 GiB = 0.94 of a node's 8 x 50 GB/s NICs")
    nvls_ar = f"{_VAL}: 8x H200 NVLS all-reduce 473 GB/s busbw at 4 GiB over 450 GB/s line rate"
    for g in ("h100-sxm", "h200"):
        add(g, "nvls_busbw_fraction.all_reduce", 473 / 450, nvls_ar)
        add(g, "nvls_busbw_fraction.gather", 0.85, f"{_TUNING}: nvlsEfficiency Hopper 0.85 "
            "(all-gather / reduce-scatter through the switch)")
    add("b200", "nvls_busbw_fraction.all_reduce", 0.0, f"{_VAL}: the published 8x B200 series "
        "saturates at 741 GB/s = 0.82 of line rate (the ring ceiling) at every size, so NVLS "
        "was not faster there; 0 = not used until `simdist calibrate` measures it")
    add("b200", "nvls_busbw_fraction.gather", 0.0, "as nvls_busbw_fraction.all_reduce on b200")
    add("*", "nvls_busbw_fraction.all_reduce", 0.0, "NVLS needs NVSwitch multicast (Hopper and "
        "later); 0 = not available on this GPU")
    add("*", "nvls_busbw_fraction.gather", 0.0, "NVLS needs NVSwitch multicast; 0 = not available")
    add("*", "proto_bw_fraction.ring.ll", 0.5, f"{_TUNING}: ring LL busBw x0.5 (8-byte lines "
        "carry 4 bytes of data)")
    add("*", "proto_bw_fraction.ring.ll128", 0.92, f"{_TUNING}: ring LL128 busBw x0.92 (120 of "
        "128 bytes are data)")
    add("*", "proto_bw_fraction.tree.ll", 1 / 3.8, f"{_TUNING}: tree LL busBw / 3.8")
    add("*", "proto_bw_fraction.tree.ll128", 120 / 128, f"{_TUNING}: tree LL128 busBw x120/128")
    add("*", "proto_bw_fraction.tree.simple", 0.92, f"{_TUNING}: tree all-reduce busBw x0.92")
    llmax = f"{_TUNING}: llMaxBws, one node"
    add("v100-32gb", "ll_max_busbw.nvlink", 39.0e9, f"{llmax} (Volta)")
    for g in ("a100-40gb", "a100-80gb"):
        add(g, "ll_max_busbw.nvlink", 87.7e9, f"{llmax} (Ampere)")
    for g in ("h100-sxm", "h200"):
        add(g, "ll_max_busbw.nvlink", 141.0e9, f"{llmax} (Hopper)")
    add("b200", "ll_max_busbw.nvlink", 282.0e9, f"{llmax} (Blackwell)")
    add("*", "ll_max_busbw.nvlink", 141.0e9, f"{llmax} (Hopper, for a GPU without its own row)")
    add("*", "ll_max_busbw.net", 20.4e9, f"{_TUNING}: llMaxBws, Intel CPU, 4+ nodes")
    add("*", "ll128_enabled.net", 0.0, f"{_TUNING} enables LL128 across nodes only where the "
        "GPU-NIC path qualifies (typeInter <= PXN); the published 4-node B200 curve "
        f"({_VAL}: 64 GB/s at 16 MiB) is Simple-protocol-like. 0 = off across nodes")
    corr = (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8,
            .9, .9)
    for i, c in enumerate(corr):
        add("*", f"nccl_tree_correction.simple.{i + 6}", c, f"{_TUNING}: treeCorrectionFactor "
            f"Simple, messages of 2^{i + 6} bytes (tree bandwidth off the model at mid sizes)")

    # --- compute beside communication ------------------------------------------------------
    add("*", "comm_slowdown.nvlink", 1.19, f"{_VAL}: GEMM 1.1-1.4x slower beside a large "
        "all-reduce (Echo, arXiv 2412.12487), 18.9% on average over four GPUs (arXiv 2507.03114); "
        "NCCL occupies 16-32 SMs")
    add("*", "comm_slowdown.net", 1.10, f"{_VAL}: the low end of 1.1-1.4x (Echo): a collective "
        "bound by the NIC moves ~9x fewer bytes per second through SMs and HBM than over NVLink")
    return r


def _check(key: str, v: float) -> None:
    kind = _KINDS[_family(key)]
    ok = math.isfinite(v) and {
        "fraction": 0 < v <= 1, "fraction0": 0 <= v <= 2, "positive": v > 0, "count": v >= 1 and v == int(v),
        "nonneg": v >= 0, "factor": v >= 1, "flag": v in (0.0, 1.0),
    }[kind]
    if not ok:
        raise ValueError(f"calibration key {key!r}: bad value {v!r} (expected {_KIND_TEXT[kind]})")


def _family(key: str) -> str:
    for fam in _KEY_FAMILIES:
        if key == fam or key.startswith(fam + "."):
            return fam
    raise KeyError(key)


_KINDS = {
    "gemm_ceiling": "fraction", "sm_count": "count", "gemm_tile_m": "count", "gemm_tile_n": "count",
    "gemm_splitk_min_k": "count",
    "attn_fwd_efficiency": "fraction", "attn_bwd_efficiency": "fraction", "hbm_fraction": "fraction",
    "launch_floor_s": "nonneg", "foreach_chunk_elems": "count", "foreach_max_blocks": "count",
    "foreach_max_tensors": "count", "nccl_base_latency_s": "nonneg", "nccl_hop_latency_s": "nonneg",
    "nccl_ring_plateau": "factor", "nccl_latency_scale": "positive", "ring_busbw_fraction": "fraction",
    "nvls_busbw_fraction": "fraction0", "proto_bw_fraction": "fraction", "ll_max_busbw": "positive",
    "ll128_enabled": "flag", "nccl_tree_correction": "fraction", "comm_slowdown": "factor",
}
_KEY_FAMILIES = tuple(sorted(_KINDS, key=len, reverse=True))
_KIND_TEXT = {"fraction": "0 < v <= 1", "fraction0": "0 <= v <= 2 (0 = not available)",
              "positive": "v > 0", "count": "an integer >= 1", "nonneg": "v >= 0",
              "factor": "v >= 1", "flag": "0 or 1"}


@dataclass(frozen=True)
class Calibration:
    """The time model's constants; build with ``default_calibration`` or ``load_calibration``."""

    values: Mapping[tuple[str, str], float] = field(repr=False)
    sources: Mapping[tuple[str, str], str] = field(repr=False)

    @classmethod
    def from_table(cls, table: pa.Table, base: Calibration | None = None) -> Calibration:
        """From a table of CALIBRATION_SCHEMA; rows override ``base`` (default: none)."""
        missing = [c for c in CALIBRATION_SCHEMA.names if c not in table.column_names]
        if missing:
            raise ValueError(f"calibration table lacks column(s) {', '.join(missing)}; "
                             f"expected {', '.join(CALIBRATION_SCHEMA.names)}")
        values = dict(base.values) if base else {}
        sources = dict(base.sources) if base else {}
        cols = {c: table.column(c).to_pylist() for c in CALIBRATION_SCHEMA.names}
        for gpu, key, value, source in zip(cols["gpu"], cols["key"], cols["value"], cols["source"]):
            try:
                _family(str(key))
            except KeyError:
                raise ValueError(f"unknown calibration key {key!r} (gpu {gpu!r}); known key families: "
                                 f"{', '.join(sorted(_KINDS))}") from None
            if gpu is None or value is None:
                raise ValueError(f"calibration key {key!r}: gpu and value must be set")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"calibration key {key!r}: bad value {value!r}") from None
            _check(key, v)
            values[(str(gpu), str(key))] = v
            sources[(str(gpu), str(key))] = "" if source is None else str(source)
        return cls(MappingProxyType(values), MappingProxyType(sources))

    def to_table(self) -> pa.Table:
        rows = sorted(self.values)
        return pa.table({
            "gpu": [g for g, _ in rows], "key": [k for _, k in rows],
            "value": [self.values[r] for r in rows], "source": [self.sources.get(r, "") for r in rows],
        }, schema=CALIBRATION_SCHEMA)

    def write(self, path: str | os.PathLike) -> None:
        """Parquet (``.parquet``) or Arrow IPC (any other suffix)."""
        _write(self.to_table(), path)

    def get(self, key: str, gpu: str = "*") -> float:
        """The value of ``key`` for ``gpu`` (a preset name), else its ``*`` row."""
        v = self.values.get((gpu, key))
        if v is None:
            v = self.values.get(("*", key))
        if v is None:
            raise KeyError(f"calibration has no value for {key!r} (gpu {gpu!r} or '*')")
        return v

    def source(self, key: str, gpu: str = "*") -> str:
        s = self.sources.get((gpu, key))
        return self.sources.get(("*", key), "") if s is None else s

    # typed accessors -------------------------------------------------------------------
    def gemm_ceiling(self, gpu: str) -> float:
        return self.get("gemm_ceiling", gpu)

    def sm_count(self, gpu: str) -> int:
        return int(self.get("sm_count", gpu))

    def gemm_tile(self, gpu: str) -> tuple[int, int]:
        """(rows, cols) of the output tile one SM computes."""
        return int(self.get("gemm_tile_m", gpu)), int(self.get("gemm_tile_n", gpu))

    def gemm_splitk_min_k(self, gpu: str) -> int:
        return int(self.get("gemm_splitk_min_k", gpu))

    def attn_efficiency(self, gpu: str, backward: bool) -> float:
        return self.get("attn_bwd_efficiency" if backward else "attn_fwd_efficiency", gpu)

    def hbm_fraction(self, gpu: str) -> float:
        return self.get("hbm_fraction", gpu)

    def launch_floor_s(self, gpu: str) -> float:
        return self.get("launch_floor_s", gpu)

    def foreach_chunk_elems(self, gpu: str) -> int:
        return int(self.get("foreach_chunk_elems", gpu))

    def foreach_max_blocks(self, gpu: str) -> int:
        return int(self.get("foreach_max_blocks", gpu))

    def foreach_max_tensors(self, gpu: str, depth: int) -> int:
        return int(self.get(f"foreach_max_tensors.d{min(max(depth, 1), 5)}", gpu))

    def nccl_base_latency_s(self, gpu: str, algorithm: str, protocol: str) -> float:
        return self.get(f"nccl_base_latency_s.{algorithm}.{protocol}", gpu)

    def nccl_hop_latency_s(self, gpu: str, level: str, algorithm: str, protocol: str) -> float:
        return self.get(f"nccl_hop_latency_s.{level}.{algorithm}.{protocol}", gpu)

    def nccl_ring_plateau(self, gpu: str) -> float:
        return self.get("nccl_ring_plateau", gpu)

    def nccl_latency_scale(self, gpu: str) -> float:
        return self.get("nccl_latency_scale", gpu)

    def ring_busbw_fraction(self, gpu: str, level: str) -> float:
        return self.get(f"ring_busbw_fraction.{level}", gpu)

    def nvls_busbw_fraction(self, gpu: str, all_reduce: bool) -> float:
        """Fraction of NVLink line rate; 0 where the GPU does not use NVLS."""
        return self.get("nvls_busbw_fraction." + ("all_reduce" if all_reduce else "gather"), gpu)

    def proto_bw_fraction(self, gpu: str, algorithm: str, protocol: str) -> float:
        if algorithm == "ring" and protocol == "simple":
            return 1.0
        return self.get(f"proto_bw_fraction.{algorithm}.{protocol}", gpu)

    def ll_max_busbw(self, gpu: str, level: str) -> float:
        return self.get(f"ll_max_busbw.{level}", gpu)

    def ll128_enabled(self, gpu: str, level: str) -> bool:
        return level == "nvlink" or bool(self.get(f"ll128_enabled.{level}", gpu))

    def tree_correction(self, gpu: str, protocol: str, log2_bytes: int) -> float:
        """NCCL's tree bandwidth correction for a message of 2**log2_bytes bytes (1 outside)."""
        key = f"nccl_tree_correction.{protocol}.{log2_bytes}"
        if (gpu, key) in self.values or ("*", key) in self.values:
            return self.get(key, gpu)
        return 1.0

    def comm_slowdown(self, gpu: str, level: str) -> float:
        """Factor on compute time while a collective on ``level`` runs beside it."""
        return self.get(f"comm_slowdown.{level}", gpu)


def _write(table: pa.Table, path: str | os.PathLike) -> None:
    p = os.fspath(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(table, p)
    else:
        with pa.OSFile(p, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)


def _read(path: str | os.PathLike) -> pa.Table:
    p = os.fspath(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(p)
    with pa.memory_map(p) as f:
        return pa.ipc.open_file(f).read_all()


def _table(rows: Iterable[tuple[str, str, float, str]]) -> pa.Table:
    g, k, v, s = zip(*rows)
    return pa.table({"gpu": list(g), "key": list(k), "value": list(v), "source": list(s)},
                    schema=CALIBRATION_SCHEMA)


_DEFAULT: Calibration | None = None


def default_calibration() -> Calibration:
    """The built-in cited defaults (one shared immutable instance)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Calibration.from_table(_table(_rows()))
    return _DEFAULT


def load_calibration(path: str | os.PathLike) -> Calibration:
    """A Parquet / Arrow IPC file of CALIBRATION_SCHEMA over the defaults (missing keys keep
    theirs). Unknown keys and bad values raise ValueError naming the key."""
    try:
        table = _read(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"cannot read calibration table {os.fspath(path)!r}: {e}") from None
    return Calibration.from_table(table, base=default_calibration())
