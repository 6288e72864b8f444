"""The pipeline memo (simdist/mode/pipeline_memo.py) against full execution of the same rank:
every field and every row of the ops, collectives, memory and kernels tables must be identical,
at a micro-batch count well above the counts the memo executes."""

from __future__ import annotations

import pytest

from conftest import make_task, run_rank, spec
from simdist.mode import pipeline_memo
from simdist.mode.pipeline_memo import PipelineShape, memo_counts
from simdist.mode.pipeline_order import COMPUTE, action_order

FIELDS = ("peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
          "other_bytes", "peak_phase", "peak_module", "flops", "model_flops", "hbm_bytes",
          "comm_bytes", "executed_microbatches")
TABLES = ("ops", "collectives", "memory", "kernels")
SEQ = 64


def _model(blocks_per_stage: int, stages: int, preset: str = "llama3-debug"):  # noqa: ANN202
    return spec(preset, n_layers=blocks_per_stage * stages, seq_len=SEQ)


def _counts(schedule: str, pp: int, stages: int, rank: int, n: int):  # noqa: ANN202
    return memo_counts(PipelineShape(schedule, pp, stages, rank), n)


def assert_same(model, **kw):  # noqa: ANN001, ANN201
    """The rank through the memo protocol and executed in full (no memo at all)."""
    full = run_rank(model, seq_len=SEQ, pipeline_memo=False, layer_memo=False, **kw)
    memo = run_rank(model, seq_len=SEQ, **kw)
    assert full.pipeline_memo == "off"
    assert memo.pipeline_memo == "memo", "the memo did not apply (fell back to full execution)"
    for f in FIELDS:
        assert getattr(memo, f) == getattr(full, f), f
    for table in TABLES:
        a, b = getattr(full, table), getattr(memo, table)
        assert a.num_rows == b.num_rows, table
        assert a.equals(b), f"{table} rows differ"
    return memo


# One fast case per schedule (the others are -m slow). Counts executed, from memo_counts: the
# smallest the schedule accepts whose units have every key of the requested count; the
# requested count is well above their sum.

def test_gpipe_fsdp_last_stage_equals_full_execution() -> None:
    # FSDP over 2: the last backward's reduce-scatter, unshard in the first forward
    assert _counts("gpipe", 2, 2, 1, 20).all() == (4, 5, 6)
    assert_same(_model(1, 2), pp=2, rank=1, dp_shard=2, num_microbatches=20,
                pp_schedule="gpipe")


def test_1f1b_last_stage_equals_full_execution() -> None:
    assert _counts("1f1b", 2, 2, 1, 20).all() == (4, 5, 6)
    assert_same(_model(1, 2), pp=2, rank=1, num_microbatches=20, pp_schedule="1f1b")


def test_interleaved_1f1b_equals_full_execution() -> None:
    # rank 1 holds stages 1 and 3 (the last); 18 micro-batches run in 9 rounds of 2, the
    # executed counts in one round (the schedule refuses 5: not a multiple of its 2 rounds)
    assert _counts("interleaved_1f1b", 2, 4, 1, 18).all() == (3, 4, 6)
    assert_same(_model(1, 4), pp=2, rank=1, num_microbatches=18,
                pp_schedule="interleaved_1f1b")


def test_zero_bubble_first_stage_equals_full_execution() -> None:
    assert _counts("zero_bubble", 2, 4, 0, 24).all() == (4, 6, 8)
    assert_same(_model(1, 4), pp=2, rank=0, num_microbatches=24, pp_schedule="zero_bubble")


def test_forced_mismatch_falls_back_to_full_execution(monkeypatch) -> None:  # noqa: ANN001
    # Keys without the first / last micro-batch flags: the first backward (which creates the
    # gradients) and a later one (which accumulates) share a key, the in-run proof sees them
    # differ, and the rank is executed in full, with the flag set.
    keys = pipeline_memo.unit_keys
    monkeypatch.setattr(pipeline_memo, "unit_keys", lambda shape, order, n: [
        (k[0], k[1]) + k[3:] for k in keys(shape, order, n)])
    kw = dict(pp=2, rank=1, num_microbatches=20, pp_schedule="gpipe", seq_len=SEQ)
    tr = run_rank(_model(1, 2), **kw)
    assert tr.pipeline_memo == "fallback"
    full = run_rank(_model(1, 2), pipeline_memo=False, **kw)
    for f in FIELDS:
        assert getattr(tr, f) == getattr(full, f), f
    for table in TABLES:
        assert getattr(tr, table).equals(getattr(full, table)), table


def test_store_round_trip_rebuilds_without_executing(tmp_path) -> None:  # noqa: ANN001
    model = _model(1, 4)
    kw = dict(pp=2, rank=0, pp_schedule="interleaved_1f1b", seq_len=SEQ,
              layer_cache_dir=str(tmp_path))
    cold = run_rank(model, num_microbatches=18, **kw)
    warm = run_rank(model, num_microbatches=18, **kw)
    assert (cold.pipeline_memo, warm.pipeline_memo) == ("memo", "memo-hit")
    # (the cold run dispatched; its hits depend on what this process executed before)
    assert cold.fake_cache["misses"] + cold.fake_cache["hits"] > 0
    assert warm.fake_cache["misses"] == warm.fake_cache["hits"] == 0  # nothing dispatched
    for table in TABLES:
        assert getattr(warm, table).equals(getattr(cold, table)), table
    # another micro-batch count with the same executed counts reuses the stored model
    assert _counts("interleaved_1f1b", 2, 4, 0, 18) == _counts("interleaved_1f1b", 2, 4, 0, 32)
    longer = run_rank(model, num_microbatches=32, **kw)
    assert longer.pipeline_memo == "memo-hit" and longer.executed_microbatches == 32
    full = run_rank(model, num_microbatches=32, pipeline_memo=False,
                    **{k: v for k, v in kw.items() if k != "layer_cache_dir"})
    for table in TABLES:
        assert getattr(longer, table).equals(getattr(full, table)), table


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"])
def test_action_order_is_the_order_each_rank_runs(schedule: str) -> None:
    # Second path: test_pipeline's _order (the single-stage schedules' loops written out from
    # their code, the runtime schedules' compute IR), which test_pipeline checks against the
    # executed kernel-stream marks; here the lowered order's compute actions must match it.
    from test_pipeline import N_MB, PP, _order, _stages

    for rank in range(PP):
        order = action_order(schedule, PP, _stages(schedule), rank, N_MB)
        assert [(a.kind, a.stage, a.mb) for a in order if a.kind in COMPUTE] == \
            _order(schedule, rank), rank


def test_counts_only_where_they_cost_less_than_the_step() -> None:
    # 1F1B on 2 stages, first stage: the smallest counts with every unit kind of a long step
    # are 5, 6 (fit) and 7 (verify): 5 + 6 + 7 micro-batches plus two more executions' start
    # (EXECUTION_COST_MICROBATCHES each) must stay below the requested count.
    cost = pipeline_memo.EXECUTION_COST_MICROBATCHES
    assert _counts("1f1b", 2, 2, 0, 64).all() == (5, 6, 7)
    assert _counts("1f1b", 2, 2, 0, 18 + 2 * cost) is None
    assert _counts("1f1b", 2, 2, 0, 18 + 2 * cost + 1).all() == (5, 6, 7)
    task = make_task(_model(1, 2), pp=2, num_microbatches=8, pp_schedule="1f1b")
    from simdist.memo import open_memo

    assert open_memo(task) is None  # too few micro-batches: executed in full


# --- slow: every schedule on a first, a middle and the last stage; FSDP, TP+SP; the layer memo --

SLOW_COUNTS = {"gpipe": 24, "1f1b": 32, "interleaved_1f1b": 24, "zero_bubble": 64}  # pp 4
PP2_COUNTS = {"gpipe": 20, "1f1b": 24, "interleaved_1f1b": 18, "zero_bubble": 32}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SLOW_COUNTS))
@pytest.mark.parametrize("rank", [0, 1, 3])
def test_first_middle_last_stage_equal_full_execution(schedule: str, rank: int) -> None:
    stages = 8 if schedule in ("interleaved_1f1b", "zero_bubble") else 4
    assert_same(_model(1, stages), pp=4, rank=rank, num_microbatches=SLOW_COUNTS[schedule],
                pp_schedule=schedule)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(PP2_COUNTS))
def test_fsdp_pipeline_equals_full_execution(schedule: str) -> None:
    stages = 4 if schedule in ("interleaved_1f1b", "zero_bubble") else 2
    assert_same(_model(1, stages), pp=2, rank=1, dp_shard=2, pp_schedule=schedule,
                num_microbatches=PP2_COUNTS[schedule])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(PP2_COUNTS))
def test_tp_sp_pipeline_equals_full_execution(schedule: str) -> None:
    stages = 4 if schedule in ("interleaved_1f1b", "zero_bubble") else 2
    # (GPT with sequence parallelism under zero bubble fails in full execution too: its
    # column-parallel linears regather their input in backward through selective checkpointing,
    # parallel/checkpointing.py regather_in_backward, which torch will not backward through
    # twice, as the split I and W passes do)
    preset = "llama3-debug" if schedule == "zero_bubble" else "gpt-debug"
    assert_same(_model(1, stages, preset), pp=2, rank=0, tp=2, sequence_parallel=True,
                pp_schedule=schedule, num_microbatches=PP2_COUNTS[schedule])


@pytest.mark.slow
def test_layer_memo_short_steps_through_the_pipeline_memo_equal_full_execution() -> None:
    # 5 blocks per stage: at 3, 4 and 6 micro-batches the layer memo rebuilds the 5-block step
    # from its 2-, 3- and 4-block ones; the pipeline memo fits those and rebuilds 18
    memo = assert_same(_model(5, 4), pp=2, rank=1, num_microbatches=18,
                       pp_schedule="interleaved_1f1b")
    assert memo.layer_memo == "memo"


def test_config_key_turns_the_memo_off() -> None:
    from simdist.config import ConfigError, load_config
    from simdist.planner import plan_run

    base = dict(model=dict(preset="llama3-debug", n_layers=4),
                training=dict(seq_len=SEQ, global_batch=64),
                parallel=dict(pp=2, dp_shard=1), cluster=dict(gpus_per_node=2, nodes=1))
    on = plan_run(load_config(base)).tasks[0]
    off = plan_run(load_config({**base, "simulation": {"pipeline_memo": False}})).tasks[0]
    assert on.pipeline_memo and not off.pipeline_memo
    with pytest.raises(ConfigError) as info:
        load_config({**base, "simulation": {"pipeline_memo": "sometimes"}})
    assert info.value.key == "simulation.pipeline_memo"


def test_layer_memo_first_then_the_pipeline_memo_equals_full_execution(tmp_path) -> None:  # noqa: ANN001
    """Both memos (simdist/memo.py: LayeredPipelineJob) on a last stage of 5 blocks, GPipe, 20
    micro-batches: at 4, 5 and 6 micro-batches the 5-block step is rebuilt by the layer memo
    (its action boundaries too: the pipeline memo cuts the streams there), the pipeline memo
    fits those and rebuilds 20; a second run reads the model back and executes nothing."""
    from dataclasses import replace

    from simdist.memo import LayeredPipelineJob, open_memo, simulate_rank
    from simdist.mode.pipeline_memo import same_streams
    from simdist.mode.rank import execute_unit

    model = _model(5, 2)
    kw = dict(pp=2, rank=1, pp_schedule="gpipe", num_microbatches=20)
    task = make_task(model, seq_len=SEQ, layer_cache_dir=str(tmp_path), **kw)
    job = open_memo(task)
    assert isinstance(job, LayeredPipelineJob)
    assert [j.task.num_microbatches for j in job.layers] == [4, 5, 6]
    step = job.layers[0]
    rebuilt = step.build([execute_unit(t, keep_streams=True).streams
                          for t in step.short_tasks()]).streams
    executed = execute_unit(replace(step.task, layer_memo=False), keep_streams=True).streams
    assert same_streams(rebuilt, executed)
    assert rebuilt.boundaries == executed.boundaries and len(executed.boundaries) > 0

    full = run_rank(model, seq_len=SEQ, pipeline_memo=False, layer_memo=False, **kw)
    memo = simulate_rank(task)
    assert (memo.layer_memo, memo.pipeline_memo) == ("memo", "memo")
    assert open_memo(task).executions == 0
    warm = simulate_rank(task)
    assert (warm.layer_memo, warm.pipeline_memo) == ("memo-hit", "memo-hit")
    for tr in (memo, warm):
        for f in FIELDS:
            assert getattr(tr, f) == getattr(full, f), f
        for table in TABLES:
            assert getattr(tr, table).equals(getattr(full, table)), table
