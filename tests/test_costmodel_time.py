"""Kernel and collective time libraries: anchored to the public figures in VALIDATION.md."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simdist.costmodel import (
    CALIBRATION_SCHEMA,
    OpClass,
    Placement,
    collective_times,
    default_calibration,
    gpu_spec,
    kernel_times,
    load_calibration,
    nccl_collective,
    op_class,
)
from simdist.costmodel.kernels import foreach_launches, gemm_dims

KiB, MiB, GiB = 2**10, 2**20, 2**30
H100, H200, B200 = gpu_spec("h100-sxm"), gpu_spec("h200"), gpu_spec("b200")
CAL = default_calibration()

# ------------------------------------------------------------ published bus bandwidth

# VALIDATION.md "Hardware facts": nccl-tests all-reduce busbw in GB/s (the expectation).
H200_1NODE = [(32 * KiB, 1.44), (256 * KiB, 11.7), (1 * MiB, 39.9), (4 * MiB, 107), (16 * MiB, 220),
              (64 * MiB, 347), (256 * MiB, 436), (1 * GiB, 464), (4 * GiB, 473)]
B200_1NODE_4NODES = [(16 * MiB, 255, 64), (64 * MiB, 401, 157), (256 * MiB, 646, 229),
                     (1 * GiB, 723, 362), (4 * GiB, 741, 377)]
PER_POINT_TOL, MEAN_TOL = 0.22, 0.10


def _busbw(nbytes: float, n: int, place: Placement, gpu) -> tuple[float, str]:
    t = collective_times(["all_reduce"], [nbytes], n, place.local_size, place.n_nodes, gpu, CAL)[0]
    e = nccl_collective("all_reduce", nbytes, n, place, gpu, CAL)
    assert e.time_s == pytest.approx(t, rel=1e-12)  # scalar and column APIs agree
    return 2 * (n - 1) / n * nbytes / t / 1e9, f"{e.algorithm}/{e.protocol}"


def _size(b: int) -> str:
    return f"{b // GiB} GiB" if b >= GiB else f"{b // MiB} MiB" if b >= MiB else f"{b // KiB} KiB"


def test_all_reduce_busbw_matches_published_measurements():
    series = {
        "8x H200, 1 node": [(s, m, Placement(8, 1), 8, H200) for s, m in H200_1NODE],
        "8x B200, 1 node": [(s, m, Placement(8, 1), 8, B200) for s, m, _ in B200_1NODE_4NODES],
        "8x B200, 4 nodes": [(s, m, Placement(8, 4), 32, B200) for s, _, m in B200_1NODE_4NODES],
    }
    lines, failures = [], []
    for name, points in series.items():
        lines.append(f"{name:18} {'size':>8} {'predicted':>10} {'published':>10} {'error':>7}  choice")
        errs = []
        for nbytes, published, place, n, gpu in points:
            pred, choice = _busbw(nbytes, n, place, gpu)
            err = pred / published - 1
            errs.append(abs(err))
            lines.append(f"{'':18} {_size(nbytes):>8} {pred:10.1f} {published:10.1f} {err:+7.1%}  {choice}")
            if abs(err) > PER_POINT_TOL:
                failures.append(f"{name} {_size(nbytes)}: {pred:.1f} vs {published} GB/s")
        mean = sum(errs) / len(errs)
        lines.append(f"{'':18} mean |error| {mean:.1%}, max {max(errs):.1%}")
        if mean > MEAN_TOL:
            failures.append(f"{name}: mean error {mean:.1%}")
    print("\nall-reduce busbw (GB/s), predicted vs VALIDATION.md\n" + "\n".join(lines))
    assert not failures, failures


def test_algorithm_choice_follows_message_size():
    small = nccl_collective("all_reduce", 32 * KiB, 8, Placement(8, 1), H200, CAL)
    large = nccl_collective("all_reduce", 1 * GiB, 8, Placement(8, 1), H200, CAL)
    assert (small.algorithm, small.protocol) == ("ring", "ll")
    assert (large.algorithm, large.protocol) == ("nvls", "simple")  # VALIDATION.md: NVLS above 2 MiB
    assert nccl_collective("all_reduce", 1 * GiB, 8, Placement(8, 1), gpu_spec("a100-80gb"), CAL).algorithm == "ring"
    assert nccl_collective("all_reduce", 64 * MiB, 32, Placement(8, 4), B200, CAL).algorithm == "tree"
    # ring all-gather inside a node tops out near the ring ceiling (VALIDATION.md: ~370 GB/s)
    ag = nccl_collective("all_gather", 4 * GiB, 8, Placement(8, 1), gpu_spec("a100-80gb"), CAL)
    assert ag.busbw == pytest.approx(0.82 * 300e9, rel=0.01)


def test_collective_columns_sharing_and_kinds():
    kinds = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv"]
    nbytes = [64 * MiB] * len(kinds)
    t = collective_times(kinds, nbytes, 16, 8, 2, H100, CAL)
    for k, ti in zip(kinds, t):
        assert ti == pytest.approx(nccl_collective(k, 64 * MiB, 16, Placement(8, 2), H100, CAL).time_s)
    assert (t > 0).all()
    # two groups sharing a node's NICs: bandwidth-bound time almost doubles
    big = 4 * GiB
    one = collective_times(["all_gather"], [big], 16, 8, 2, H100, CAL)[0]
    two = collective_times(["all_gather"], [big], 16, 8, 2, H100, CAL, nic_sharing=2)[0]
    assert 1.9 < two / one <= 2.0
    # one GPU per node (e.g. DP across TP-8 nodes): one NIC carries the ring
    dp = nccl_collective("all_reduce", big, 4, Placement(1, 4), H100, CAL)
    assert dp.busbw < 50e9 and dp.busbw > 0.8 * 0.94 * 50e9
    # p2p across nodes runs at NIC speed, inside a node at NVLink speed
    p_net = nccl_collective("send", big, 2, Placement(1, 2), H100, CAL)
    p_nvl = nccl_collective("send", big, 2, Placement(2, 1), H100, CAL)
    assert p_net.busbw == pytest.approx(0.94 * 50e9, rel=0.01)
    assert p_nvl.busbw == pytest.approx(0.82 * 450e9, rel=0.01)
    zero = collective_times(["all_reduce", "all_reduce"], [0, 1e6], [8, 1], [8, 1], [1, 1], H100, CAL)
    assert zero.tolist() == [0, 0]
    with pytest.raises(ValueError, match="placement"):
        nccl_collective("all_reduce", 1e6, 8, Placement(4, 1), H100, CAL)
    with pytest.raises(ValueError, match="unknown collective kind"):
        collective_times(["gather"], [1.0], 2, 2, 1, H100, CAL)


# ------------------------------------------------------------ kernels


def _ops(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([dict(phase="fwd", module="m", count=1) | r for r in rows])


def _gemm(m: int, n: int, k: int, count: int = 1) -> dict:
    return dict(op="mm", shapes=f"{m}x{k}:bfloat16;{k}x{n}:bfloat16", count=count,
                flops=2 * m * n * k * count, bytes=2 * (m * k + k * n + m * n) * count)


def test_large_square_gemm_runs_at_the_published_ceiling():
    m = 16384
    t = kernel_times(_ops([_gemm(m, m, m)]), H100, CAL)[0]
    achieved = 2 * m**3 / t
    # VALIDATION.md: H100 SXM 792 TF/s = 0.80 x 989; tile/wave quantisation costs < 2% here
    assert achieved == pytest.approx(0.80 * 989e12, rel=0.02)


def test_wave_quantisation_just_above_a_tile_multiple():
    # H100: 132 SMs; CTA tiles 128x256 (either way) or 128x128. M = 128*132, N = 2048:
    # 132*8 = 1056 tiles of 128x256 = 8 full waves (efficiency 1). M + 1 needs 133*8 = 1064
    # (or 67*16 = 1072) of them, 9 waves; or 133*16 = 2128 tiles of 128x128, 17 waves, for
    # (M+1)*N/128^2 tiles of useful work: the better choice, efficiency 2112.1/2244.
    m, n, k = 128 * 132, 2048, 8192
    t0, t1 = kernel_times(_ops([_gemm(m, n, k), _gemm(m + 1, n, k)]), H100, CAL)
    per_flop_ratio = (t1 / (m + 1)) / (t0 / m)
    eff_wide = ((m + 1) * n / (128 * 256)) / (9 * 132)
    eff_square = ((m + 1) * n / (128 * 128)) / (17 * 132)
    expected = 1 / max(eff_wide, eff_square)
    assert per_flop_ratio == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(17 / 16, rel=1e-3)


def test_small_gemm_is_memory_bound_and_count_multiplies():
    row = _gemm(64, 64, 64, count=10)
    t = kernel_times(_ops([row]), H100, CAL)[0]
    assert t == pytest.approx(10 * CAL.launch_floor_s("h100-sxm"))


def test_memory_bound_op_at_achievable_hbm_bandwidth():
    b = 10**9
    rows = [dict(op="add", shapes="250000000:bfloat16;250000000:bfloat16", flops=0, bytes=b),
            dict(op="simdist.fused_rms_norm", shapes="1x4096x8192:bfloat16;8192:bfloat16", flops=0, bytes=b)]
    t = kernel_times(_ops(rows), H100, CAL)
    assert t == pytest.approx([b / (3.35e12 * CAL.hbm_fraction("h100-sxm"))] * 2, rel=1e-12)


def test_flash_backward_slower_per_flop_by_the_efficiency_ratio():
    q = "8x32x8192x128:bfloat16"
    f = 10**13
    rows = [dict(op="_scaled_dot_product_flash_attention", shapes=f"{q};{q};{q}", flops=f, bytes=10**8),
            dict(op="_scaled_dot_product_flash_attention_backward", phase="bwd",
                 shapes=";".join([q] * 5), flops=2 * f, bytes=2 * 10**8)]
    fwd, bwd = kernel_times(_ops(rows), H100, CAL)
    assert (bwd / 2) / fwd == pytest.approx(0.72 / 0.55, rel=1e-12)
    assert fwd == pytest.approx(f / (989e12 * 0.72), rel=1e-12)


def test_op_classes_of_recorded_names():
    assert op_class("mm") is op_class("aten.addmm") is op_class("_scaled_mm") is OpClass.GEMM
    assert op_class("_scaled_dot_product_flash_attention") is OpClass.ATTENTION_FWD
    assert op_class("_scaled_dot_product_efficient_attention_backward") is OpClass.ATTENTION_BWD
    assert op_class("_scaled_dot_product_cudnn_attention_backward") is OpClass.ATTENTION_BWD
    assert op_class("_foreach_sqrt") is op_class("_fused_adamw_") is OpClass.FOREACH
    assert op_class("silu_backward") is op_class("mul") is op_class("_to_copy") is OpClass.POINTWISE
    for name in ("simdist.fused_rms_norm", "_log_softmax", "embedding", "cat", "sum", "fsdp.all_gather_copy_in"):
        assert op_class(name) is OpClass.MEMORY, name
    for name in ("view", "_c10d_functional.all_gather_into_tensor", "c10d.allreduce_"):
        assert op_class(name) is OpClass.NONE, name
    assert gemm_dims("bmm", "4x128x64:bfloat16;4x64x256:bfloat16") == (4, 128, 256, 64)
    assert gemm_dims("addmm", "256:bfloat16;128x64:bfloat16;64x256:bfloat16") == (1, 128, 256, 64)
    assert gemm_dims("linear", "2x10x64:bfloat16;256x64:bfloat16;256:bfloat16") == (1, 20, 256, 64)


def test_foreach_launches_follow_multi_tensor_apply():
    lim = [CAL.foreach_max_tensors("h100-sxm", d) for d in range(1, 6)]
    # _foreach_sqrt(list) is out of place: depth 2 -> at most 64 tensors per launch
    assert foreach_launches("_foreach_sqrt", ";".join(["1000:float32"] * 200), 65536, 320, lim) == 4
    # _foreach_add(list, list): depth 3 -> 48 tensors per launch; (list, scalar tensor): depth 2
    assert foreach_launches("_foreach_add", ";".join(["1000:float32"] * 200), 65536, 320, lim) == 3
    assert foreach_launches("_foreach_add", ";".join(["1000:float32"] * 101), 65536, 320, lim) == 2
    # one tensor of 700 chunks: 320 blocks per launch -> 3 launches
    assert foreach_launches("_foreach_sqrt", f"{65536 * 700}:float32", 65536, 320, lim) == 3
    row = dict(op="_foreach_sqrt", shapes=";".join(["1000:float32"] * 200), flops=0, bytes=1600 * 1000)
    t = kernel_times(_ops([row]), H100, CAL)[0]
    assert t == pytest.approx(4 * CAL.launch_floor_s("h100-sxm"))


def test_compile_fuses_a_pointwise_chain():
    x = "4096x8192:bfloat16"
    nb = 4096 * 8192 * 2
    rows = [dict(op="silu", shapes=x, flops=0, bytes=2 * nb),
            dict(op="mul", shapes=f"{x};{x}", flops=0, bytes=3 * nb),
            dict(op="add", shapes=f"{x};{x}", flops=0, bytes=3 * nb),
            dict(op="_log_softmax", shapes=x, flops=0, bytes=2 * nb)]
    ops = _ops(rows)
    eager = kernel_times(ops, H100, CAL)
    fused = kernel_times(ops, H100, CAL, compile=True)
    bw = 3.35e12 * CAL.hbm_fraction("h100-sxm")
    # one kernel reads silu's input and writes add's output
    assert fused[:3].sum() == pytest.approx((nb + nb) / bw, rel=1e-12)
    assert fused[3] == eager[3]  # not pointwise: unfused
    assert eager[:3].sum() == pytest.approx(8 * nb / bw, rel=1e-12)


def test_views_collectives_and_empty_rows_cost_nothing():
    rows = [dict(op="view", shapes="8:float32", flops=0, bytes=32),
            dict(op="_c10d_functional.all_reduce", shapes="8:float32", flops=0, bytes=32),
            dict(op="add", shapes="", flops=0, bytes=0),
            dict(op="add", shapes="8:float32", count=0, flops=0, bytes=0)]
    assert kernel_times(_ops(rows), H100, CAL).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="lacks column"):
        kernel_times({"op": ["mm"]}, H100, CAL)


# ------------------------------------------------------------ calibration table


def test_calibration_round_trip_equals_defaults(tmp_path):
    for name in ("cal.parquet", "cal.arrow"):
        CAL.write(tmp_path / name)
        back = load_calibration(tmp_path / name)
        assert back.values == CAL.values and back.sources == CAL.sources
    t = pq.read_table(tmp_path / "cal.parquet")
    assert t.schema.equals(CALIBRATION_SCHEMA)
    assert all(s for s in t.column("source").to_pylist())  # every constant is cited


def test_calibration_values_and_accessors():
    assert [CAL.gemm_ceiling(g) for g in ("a100-80gb", "h100-sxm", "b200")] == [0.86, 0.80, 0.78]
    assert [CAL.sm_count(g) for g in ("a100-80gb", "h100-sxm", "h200", "b200", "mi300x")] == [108, 132, 132, 148, 304]
    assert (CAL.attn_efficiency("h100-sxm", False), CAL.attn_efficiency("h100-sxm", True)) == (0.72, 0.55)
    assert CAL.gemm_ceiling("my-custom-gpu") == CAL.get("gemm_ceiling", "*")
    assert CAL.nvls_busbw_fraction("a100-80gb", True) == 0.0
    assert 1.1 <= CAL.comm_slowdown("h100-sxm", "net") <= CAL.comm_slowdown("h100-sxm", "nvlink") <= 1.4
    assert CAL.nccl_hop_latency_s("h100-sxm", "nvlink", "ring", "ll") == pytest.approx(0.6e-6)


def test_load_calibration_rejects_unknown_keys_and_bad_values_and_keeps_defaults(tmp_path):
    def write(rows: list[tuple]) -> str:
        p = str(tmp_path / "c.parquet")
        g, k, v, s = zip(*rows)
        pq.write_table(pa.table({"gpu": list(g), "key": list(k), "value": list(v), "source": list(s)},
                                schema=CALIBRATION_SCHEMA), p)
        return p

    with pytest.raises(ValueError, match="gemm_ceilng"):
        load_calibration(write([("h100-sxm", "gemm_ceilng", 0.8, "typo")]))
    with pytest.raises(ValueError, match="hbm_fraction"):
        load_calibration(write([("*", "hbm_fraction", 1.5, "impossible")]))
    with pytest.raises(ValueError, match="sm_count"):
        load_calibration(write([("h100-sxm", "sm_count", 131.5, "not an integer")]))
    cal = load_calibration(write([("h100-sxm", "gemm_ceiling", 0.75, "measured here")]))
    assert cal.gemm_ceiling("h100-sxm") == 0.75 and cal.source("gemm_ceiling", "h100-sxm") == "measured here"
    assert cal.gemm_ceiling("b200") == 0.78 and cal.sm_count("h100-sxm") == 132  # defaults kept
    with pytest.raises(ValueError, match="cannot read"):
        load_calibration(tmp_path / "missing.parquet")
    assert math.isclose(cal.hbm_fraction("h100-sxm"), CAL.hbm_fraction("h100-sxm"))
    assert np.isfinite(kernel_times(_ops([_gemm(4096, 4096, 4096)]), H100, cal)).all()
