"""Stage sharing (simdist/mode/stage_share.py): a middle pipeline rank rebuilt from another
middle rank's units must equal its own full execution, event for event on every stream and row
for row on every table, for every schedule and for FSDP, TP + SP, CP and ZeRO-1 stages; and in
a run, the ranks that share are exactly the middle ranks of one program."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_task, spec
from simdist.memo import (open_memo, planned_executions, share_sources, simulate_classes,
                          simulate_rank)
from simdist.mode import stage_share
from simdist.mode.pipeline_memo import FitError, same_streams
from simdist.mode.rank import execute_rank
from simdist.trace import STREAMS
from simdist.workers.local import LocalPool

SEQ = 64
TABLES = ("ops", "collectives", "memory", "kernels")
FIELDS = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes", "peak_phase", "peak_module", "flops", "model_flops", "hbm_bytes",
          "comm_bytes", "executed_microbatches")


def _rank_at(task, pp_rank: int) -> int:  # noqa: ANN001
    """The rank at pipeline coordinate `pp_rank`, every other coordinate 0."""
    layout = task.layout
    return next(r for r in range(layout.world_size)
                if layout.coords(r)["pp"] == pp_rank
                and all(c == 0 for d, c in layout.coords(r).items() if d != "pp"))


def _tasks(pp: int, ranks: list[int], blocks_per_stage: int = 2, preset: str = "llama3-debug",
           **kw) -> list:
    stages = pp * kw.get("pp_virtual_stages", 1)
    n_layers = kw.pop("n_layers", blocks_per_stage * stages)
    model = spec(preset, n_layers=n_layers, seq_len=SEQ)
    base = make_task(model, pp=pp, seq_len=SEQ, **kw)
    return [make_task(model, rank=_rank_at(base, r), pp=pp, seq_len=SEQ, **kw) for r in ranks]


def assert_shared_equals_executed(pp: int, **kw) -> None:
    """Every middle rank but the first rebuilt from the first's executed step equals its own
    executed step, stream for stream (the independent expectation: execution)."""
    tasks = _tasks(pp, list(range(1, pp - 1)), **kw)
    steps = [execute_rank(t).streams for t in tasks]
    keys = {stage_share.share_key(t) for t in tasks}
    assert len(keys) == 1 and None not in keys
    units = stage_share.unit_model(tasks[0], steps[0])
    for task, executed in zip(tasks[1:], steps[1:]):
        rebuilt = stage_share.rebuild(units, tasks[0], task)
        for name in STREAMS:
            assert getattr(rebuilt, name) == getattr(executed, name), (task.rank, name)
        assert same_streams(rebuilt, executed)


def test_1f1b_middle_ranks_share_with_fsdp() -> None:
    # pp 5: ranks 1, 2, 3 have warm-ups of 4, 3 and 2 forwards (torch's Schedule1F1B)
    assert_shared_equals_executed(5, num_microbatches=8, pp_schedule="1f1b", dp_shard=2)


def test_interleaved_middle_ranks_share_with_tp_sp() -> None:
    assert_shared_equals_executed(4, num_microbatches=8, pp_schedule="interleaved_1f1b",
                                  pp_virtual_stages=2, tp=2, sequence_parallel=True)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,n", [("gpipe", 6), ("1f1b", 8), ("interleaved_1f1b", 8),
                                        ("zero_bubble", 8)])
@pytest.mark.parametrize("plan", ["fsdp", "tp_sp", "cp", "zero1", "full_ac"])
def test_every_schedule_and_plan_shares_exactly(schedule: str, n: int, plan: str) -> None:
    kw = dict(num_microbatches=n, pp_schedule=schedule)
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        kw["pp_virtual_stages"] = 2
    kw.update({"fsdp": dict(dp_shard=2), "tp_sp": dict(tp=2, sequence_parallel=True),
               "cp": dict(cp=2), "zero1": dict(dp_shard=2, zero_stage=1),
               "full_ac": dict(dp_shard=2, activation_checkpointing="full")}[plan])
    assert_shared_equals_executed(4, **kw)


def _stages16(n: int, **kw) -> list:
    # 126 blocks over 16 stages (as Llama 3 405B): stages 0-13 hold 8, 14-15 hold 7
    return _tasks(16, list(range(16)), blocks_per_stage=0, n_layers=126, num_microbatches=n,
                  pp_schedule="1f1b", dp_shard=2, **kw)


def test_share_key_is_the_middle_ranks_of_one_program() -> None:
    tasks = _stages16(32)
    keys = [stage_share.share_key(t) for t in tasks]
    assert keys[0] is None and keys[15] is None  # the first and the last stage's ranks
    assert len(set(keys[1:14])) == 1 and keys[14] != keys[13] and keys[14] is not None
    # another data-parallel coordinate is another key (the signature keeps the position)
    other = make_task(tasks[3].model, rank=tasks[3].rank + 1, pp=16, seq_len=SEQ,
                      num_microbatches=32, dp_shard=2)
    assert stage_share.share_key(other) != keys[3]
    # ranks 2-13 from rank 1; rank 14, the only middle rank of 7 blocks, simulates itself
    jobs = [None] * 16
    assert share_sources(tasks, jobs) == [None, None] + [1] * 12 + [None, None]
    assert share_sources(_stages16(32, stage_sharing=False), jobs) == [None] * 16


def test_sources_hold_every_key_their_ranks_need() -> None:
    # 16 micro-batches on 16 stages: torch's 1F1B gives rank r a warm-up of 16 - r forwards, so
    # rank 1 never runs a forward between two backwards, and only rank 1 runs its last forward
    # right after the first backward: ranks 2 and 4-13 take rank 3's units (one of the longest
    # key sets), rank 1 simulates itself
    tasks = _stages16(16)
    sources = share_sources(tasks, [None] * 16)
    assert set(s for s in sources if s is not None) == {3}
    keys = [stage_share.unit_keys_of(t) for t in tasks]
    assert not keys[1] <= keys[3] and not keys[2] <= keys[1]
    for i, s in enumerate(sources):
        if s is not None:
            assert keys[i] <= keys[s], i
    assert sources[1] is None and sources[3] is None and sources[14] is None


def _assert_same_trace(a, b) -> None:  # noqa: ANN001
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    for t in TABLES:
        assert getattr(a, t).equals(getattr(b, t)), t


# The classes of a pp 4 run, by the memo that makes each step: the pipeline memo alone (GPipe,
# 20 micro-batches: 4, 5, 6 executed), the layer memo alone (5 blocks per stage, 1F1B with 8
# micro-batches: too few for the pipeline memo) and both (interleaved, 24 micro-batches).
RUNS = {
    "pipeline": dict(blocks_per_stage=2, num_microbatches=20, pp_schedule="gpipe",
                     layer_memo=False),
    "layer": dict(blocks_per_stage=5, num_microbatches=8, pp_schedule="1f1b"),
    "both": dict(blocks_per_stage=5, num_microbatches=24, pp_schedule="interleaved_1f1b",
                 pp_virtual_stages=2),
}
STATUS = {"pipeline": ("memo", "memo-hit"), "layer": ("full", "full"),
          "both": ("memo", "memo-hit")}


@pytest.mark.parametrize("memo", [
    "pipeline", "layer", pytest.param("both", marks=pytest.mark.slow)])
def test_run_rebuilds_middle_ranks_exactly(memo: str, tmp_path) -> None:  # noqa: ANN001
    tasks = _tasks(4, [0, 1, 2, 3], layer_cache_dir=str(tmp_path), **RUNS[memo])
    jobs = [open_memo(t) for t in tasks]
    assert share_sources(tasks, jobs) == [None, None, 1, None]
    traces = asyncio.run(simulate_classes(LocalPool(), tasks, jobs))
    cold, warm = STATUS[memo]
    assert [t.pipeline_memo for t in traces] == [cold, cold, "shared", cold]
    assert traces[2].blocks_executed == 0 and traces[2].blocks_total == traces[1].blocks_total
    # rank 2's own simulation, every block and micro-batch executed
    kw = {**RUNS[memo], "layer_memo": False, "pipeline_memo": False}
    full = simulate_rank(_tasks(4, [2], **kw)[0])
    _assert_same_trace(traces[2], full)
    # a later run: the source's model is stored, it executes nothing, rank 2 is still shared
    jobs = [open_memo(t) for t in tasks]
    assert planned_executions(tasks, jobs) == 0
    traces = asyncio.run(simulate_classes(LocalPool(), tasks, jobs))
    assert [t.pipeline_memo for t in traces] == [warm, warm, "shared", warm]
    _assert_same_trace(traces[2], full)


def test_a_unit_the_source_lacks_means_the_rank_simulates_itself(monkeypatch) -> None:  # noqa: ANN001
    tasks = _tasks(4, [1, 2], num_microbatches=8, pp_schedule="1f1b")

    def missing(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise FitError("no unit of key ('F', 1, ...)")

    import simdist.memo as memo

    monkeypatch.setattr(memo, "rebuild", missing)
    traces = asyncio.run(simulate_classes(LocalPool(), tasks, [None, None]))
    assert [t.pipeline_memo for t in traces] == ["full", "full"]
    _assert_same_trace(traces[1], execute_rank(tasks[1]))


def test_a_failing_source_fails_the_ranks_that_wait_for_it(monkeypatch) -> None:  # noqa: ANN001
    tasks = _tasks(4, [1, 2], num_microbatches=8, pp_schedule="1f1b")

    class Failing(LocalPool):
        def execute(self, task, keep_streams=False):  # noqa: ANN001, ANN202
            raise RuntimeError("rank failed")

    async def run() -> None:
        await asyncio.wait_for(simulate_classes(Failing(), tasks, [None, None]), 60)

    with pytest.raises(RuntimeError, match="rank failed"):
        asyncio.run(run())


def test_config_key_and_no_cache_turn_sharing_off() -> None:
    from simdist.config import ConfigError, load_config
    from simdist.planner import plan_run

    base = dict(model=dict(preset="llama3-debug", n_layers=4),
                training=dict(seq_len=SEQ, global_batch=8),
                parallel=dict(pp=4, dp_shard=1), cluster=dict(gpus_per_node=4, nodes=1))
    assert all(t.stage_sharing for t in plan_run(load_config(base)).tasks)
    off = load_config({**base, "simulation": {"stage_sharing": False}})
    assert not any(t.stage_sharing for t in plan_run(off).tasks)
    assert not any(t.stage_sharing for t in plan_run(load_config(base), use_cache=False).tasks)
    with pytest.raises(ConfigError) as info:
        load_config({**base, "simulation": {"stage_sharing": "sometimes"}})
    assert info.value.key == "simulation.stage_sharing"
