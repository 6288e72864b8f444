"""The time model (costmodel/step_sim.py over the recorded kernel stream) against what must
emerge from it: the 1F1B bubble, FSDP's exposed first all-gather and last reduce-scatter, the
NIC's cost for groups that cross nodes, a valid Chrome trace, and a second, independent replay
of the recorded rows by the documented rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import simulate_here
from simdist.costmodel import gpu_spec
from simdist.costmodel.calibration import default_calibration
from simdist.costmodel.collectives import collective_times

CAL = default_calibration()


def plan(model: dict, training: dict, parallel: dict, cluster: dict):  # noqa: ANN201
    return simulate_here({"model": model, "training": training, "parallel": parallel,
                          "cluster": {"gpu": "h100-sxm", **cluster}})


# --- pipelines: the bubble emerges from replaying the schedule across stages ------------------

def _bubble_fraction(schedule: str, p: int, m: int, v: int = 2) -> float:
    # Uniform stages: 4 identical blocks per stage, a tiny vocabulary (the head and loss of the
    # last stage cost little next to its blocks).
    par = {"pp": p, "pp_schedule": schedule, "dp_shard": 1}
    if schedule == "interleaved_1f1b":
        par["pp_virtual_stages"] = v
    res = plan({"preset": "llama3-debug", "n_layers": 4 * p * (v if schedule != "1f1b" else 1),
                "dim": 512, "ffn_dim": 2048, "vocab_size": 256},
               {"seq_len": 1024, "micro_batch": 1, "global_batch": m},
               par, {"gpus_per_node": p, "nodes": 1})
    middle = res.ranks.to_pylist()[1]  # a middle stage: neither the embedding nor the head
    # The time of its schedule's actions (their kernels, between the begin and end marks):
    # the bubble is idle time of the schedule, so its share is of actions + bubble (the step
    # also holds the optimizer, outside the schedule).
    k = [e for e in res.kernels.to_pylist() if e["class_id"] == middle["class_id"]]
    inside, busy = False, 0.0
    for e in k:
        if e["kind"] == "mark":
            inside = e["label"].startswith("begin")
        elif inside and e["stream"] == "compute":
            busy += e["est_time_s"]
    return middle["bubble_s"] / (middle["bubble_s"] + busy)


def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    p, m = 4, 8
    expected = (p - 1) / (m + p - 1)  # Narayanan et al. 2021, 1F1B with uniform stages
    got = _bubble_fraction("1f1b", p, m)
    assert got == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
def test_interleaving_shrinks_the_bubble_by_about_v():
    p, m, v = 4, 8, 2
    plain = _bubble_fraction("1f1b", p, m)
    inter = _bubble_fraction("interleaved_1f1b", p, m, v)
    assert plain / inter == pytest.approx(v, rel=0.25)


# --- FSDP ------------------------------------------------------------------------------------

LLAMA_SMALL = {"preset": "llama3-debug", "n_layers": 6, "dim": 1024, "ffn_dim": 4096,
               "n_heads": 16, "n_kv_heads": 4, "vocab_size": 4096}


def test_fsdp_first_all_gather_and_last_reduce_scatter_are_exposed():
    res = plan(LLAMA_SMALL, {"seq_len": 1024}, {"dp_shard": -1}, {"gpus_per_node": 8, "nodes": 2})
    k = res.kernels.to_pylist()
    colls = res.collectives.to_pylist()
    first_ag = next(e for e in k if e["kind"] == "coll" and colls[e["row"]]["kind"] == "all_gather")
    last_rs = next(e for e in reversed(k)
                   if e["kind"] == "coll" and colls[e["row"]]["kind"] == "reduce_scatter")
    r = res.ranks.to_pylist()[0]
    # Nothing computes before the first all-gather is in, and the optimizer waits for the last
    # reduce-scatter, which starts after the last backward op: both are on the critical path.
    assert r["exposed_comm_s"] >= first_ag["est_time_s"] + last_rs["est_time_s"] - 1e-12
    assert r["step_s"] >= r["compute_s"] + first_ag["est_time_s"] + last_rs["est_time_s"] - 1e-12


def test_fsdp_on_8_nodes_costs_what_the_nic_explains():
    one = plan(LLAMA_SMALL, {"seq_len": 1024}, {"dp_shard": -1}, {"gpus_per_node": 8, "nodes": 1})
    many = plan(LLAMA_SMALL, {"seq_len": 1024, "global_batch": 8}, {"dp_shard": 8,
                "dp_replicate": 1}, {"gpus_per_node": 1, "nodes": 8})
    a, b = one.ranks.to_pylist()[0], many.ranks.to_pylist()[0]
    # The same ranks (8-way FSDP, the same shards), one node vs one GPU per node: identical
    # recorded rows, so compute is the same and the step differs by exposed communication.
    assert one.ops.column("est_time_s").equals(many.ops.column("est_time_s"))
    assert b["comm_s"] > a["comm_s"]
    gpu = gpu_spec("h100-sxm")
    rows = one.collectives.to_pylist()
    nvlink = collective_times([r["kind"] for r in rows], [r["bytes"] for r in rows],
                              [r["group_size"] for r in rows], 8, 1, gpu, CAL)
    nic = collective_times([r["kind"] for r in rows], [r["bytes"] for r in rows],
                           [r["group_size"] for r in rows], 1, 8, gpu, CAL)
    counts = np.array([r["count"] for r in rows])
    assert a["comm_s"] == pytest.approx(float((nvlink * counts).sum()), rel=1e-9)
    assert b["comm_s"] == pytest.approx(float((nic * counts).sum()), rel=1e-9)
    assert 0 < b["step_s"] - a["step_s"] <= b["comm_s"] - a["comm_s"] + 1e-12


def test_tp_across_nodes_is_slower_by_the_nic_on_its_collectives():
    model = {"preset": "gpt-debug", "n_layers": 2, "dim": 1024, "n_heads": 16, "vocab_size": 4096}
    train = {"seq_len": 1024}
    inside = plan(model, train, {"tp": 4, "dp_shard": 1}, {"gpus_per_node": 4, "nodes": 1})
    across = plan(model, train, {"tp": 4, "dp_shard": 1}, {"gpus_per_node": 2, "nodes": 2})
    a, b = inside.ranks.to_pylist()[0], across.ranks.to_pylist()[0]
    rows = inside.collectives.to_pylist()
    tp = [r for r in rows if r["mesh_dim"] == "tp"]
    gpu = gpu_spec("h100-sxm")
    args = ([r["kind"] for r in tp], [r["bytes"] for r in tp], [r["group_size"] for r in tp])
    count = np.array([r["count"] for r in tp])
    nvlink = float((collective_times(*args, 4, 1, gpu, CAL) * count).sum())
    nic = float((collective_times(*args, 2, 2, gpu, CAL) * count).sum())
    # TP collectives are synchronous (the next op reads their result): every second of them is
    # on the critical path, so the step grows by the NIC's extra time on them.
    assert nic > nvlink
    assert b["step_s"] - a["step_s"] == pytest.approx(nic - nvlink, rel=0.05)


# --- the picture -------------------------------------------------------------------------------

def test_timeline_is_valid_chrome_trace():
    res = plan(LLAMA_SMALL, {"seq_len": 512}, {"dp_shard": -1}, {"gpus_per_node": 8, "nodes": 2})
    doc = json.loads(json.dumps(res.timeline))
    events = doc["traceEvents"]
    assert events
    for e in events:
        assert {"ph", "ts", "dur", "pid", "tid"} <= set(e), e
    spans = [e for e in events if e["ph"] == "X"]
    by_thread: dict = {}
    for e in spans:
        by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: e["ts"])
        for x, y in zip(evs, evs[1:]):
            assert x["ts"] + x["dur"] <= y["ts"] + 1e-6, (x, y)
    # A collective starts after the compute issued before it has ended: every collective span
    # starts no earlier than some compute span's end or at 0.
    names = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    compute = sorted((e for e in spans if e["tid"] == names["compute"]), key=lambda e: e["ts"])
    ends = [0.0] + [e["ts"] + e["dur"] for e in compute]
    for e in spans:
        if e["tid"] == names.get("dp_shard"):
            assert any(abs(e["ts"] - t) < 1e-6 or e["ts"] >= t for t in ends)


# --- a second replay by the documented rules ----------------------------------------------------

def _replay(res, cid: int = 0):  # noqa: ANN001, ANN202
    """The step of class `cid`'s first rank by the rules in costmodel/step_sim.py's docstring,
    written again from the recorded tables (no contention, no repeated runs: weights 1)."""
    k = [e for e in res.kernels.to_pylist() if e["class_id"] == cid]
    t, free, done, prev_phase, prev_side = 0.0, {}, [], "", None
    exposed = 0.0
    for e in k:
        d = e["est_time_s"]
        if e["kind"] == "mark":
            done.append(t)
            continue
        if e["stream"] == "compute":
            ready = t
            if (prev_phase == "bwd" and e["phase"] != "bwd") or (
                    e["phase"] == "optim" and prev_phase != "optim") or e["wait"] == -2:
                ready = max([t, *free.values()])
            elif e["wait"] >= 0:
                ready = max(t, done[e["wait"]])
            exposed += ready - t
            t = ready + d
            done.append(t)
            prev_side = None
        else:
            start = max(free.get(e["stream"], 0.0), t, prev_side or 0.0)
            free[e["stream"]] = start + d
            done.append(start + d)
            prev_side = start + d
        prev_phase = e["phase"]
    return max([t, *free.values()]), exposed


@pytest.mark.parametrize("name, parallel, cluster", [
    ("fsdp16_two_nodes", {"dp_shard": -1}, {"gpus_per_node": 8, "nodes": 2}),
    ("hsdp_2x8", {"dp_replicate": 2, "dp_shard": 8}, {"gpus_per_node": 8, "nodes": 2}),
    ("cp4_dp2", {"cp": 4, "dp_shard": 2}, {"gpus_per_node": 8, "nodes": 1}),
])
def test_step_time_replayed_independently(name, parallel, cluster):
    # The replay leaves out only the calibrated contention (compute beside a collective runs
    # slower), which can lengthen the step by at most (factor - 1) x the collective time.
    res = plan(LLAMA_SMALL, {"seq_len": 1024}, parallel, cluster)
    step, exposed = _replay(res)
    r = res.ranks.to_pylist()[0]
    # contention only lengthens compute that overlaps a collective: the merge's step lies
    # between the replay's and the replay's plus every overlapped second slowed by the largest
    # factor
    slow = max(CAL.comm_slowdown("h100-sxm", lvl) for lvl in ("nvlink", "net"))
    assert step <= r["step_s"] + 1e-12
    assert r["step_s"] <= step + (slow - 1) * r["comm_s"] + 1e-12
    # throughput and MFU follow from the step by their definitions
    tokens = 1024 * (cluster["nodes"] * cluster["gpus_per_node"]) // parallel.get("cp", 1)
    assert res.summary["tokens_per_s"] == pytest.approx(tokens / res.summary["step_time_s"])
    gpu = gpu_spec("h100-sxm")
    world = cluster["nodes"] * cluster["gpus_per_node"]
    assert res.summary["mfu"] == pytest.approx(
        res.summary["model_flops_per_step"] / (world * res.summary["step_time_s"] * gpu.bf16_flops))
