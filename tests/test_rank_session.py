"""Rank sessions of one rank and layout share their DeviceMeshes' token (mode/session.py:
RankSession), so DTensor's mesh-keyed caches carry over from one session to the next. The
expectation each test compares against is a second execution path: the same step executed
with meshes of its own (`share_meshes=False`, which every session used before), event for
event on every stream."""

from __future__ import annotations

import torch

from conftest import make_task, spec
from simdist.mode import rank as rank_mode
from simdist.mode import session as session_mode
from simdist.mode.rank import StepInputs, run_rank_step

SEQ = 64


def _task(rank: int, n_layers: int = 2):  # noqa: ANN202
    # TP2 x PP2: DTensor sharding propagation (TP) and a pipeline schedule in each session
    return make_task(spec("llama3-debug", n_layers=n_layers, seq_len=SEQ), rank=rank, tp=2, pp=2,
                     seq_len=SEQ, num_microbatches=2, pp_schedule="1f1b")


def _streams(fields: dict) -> tuple:
    s = fields["streams"]
    return s.memory, s.ops, s.collectives, s.kernels, s.boundaries, s.scalars


def _own_meshes(task) -> tuple:  # noqa: ANN001
    return _streams(rank_mode._run_rank_step(task, StepInputs(), share_meshes=False))


def _sharding_misses() -> int:
    return torch._C._get_DTensor_sharding_propagator_cache_stats()[1]


def test_sessions_of_one_rank_share_caches_and_equal_own_meshes() -> None:
    first, other, deeper = _task(0), _task(2), _task(0, n_layers=4)  # ranks 0, 2: both stages
    expected = {id(t): _own_meshes(t) for t in (first, other, deeper)}
    # first, other, first again (the rank of stage 0 after the rank of stage 1), deeper: the
    # memo's next short step of the same class
    new_misses = []
    for t in (first, other, first, deeper):
        misses = _sharding_misses()
        assert _streams(run_rank_step(t)) == expected[id(t)]
        new_misses.append(_sharding_misses() - misses)
    # The first session of each rank computes its sharding; the same step again finds it all
    # in the fast path's cache, the deeper one all but what its depth adds (the optimizer's
    # foreach ops over longer parameter lists).
    assert new_misses[0] > 0 and new_misses[1] > 0
    assert new_misses[2] == 0 and new_misses[3] < new_misses[0]


def test_groups_that_differ_execute_the_step_again_with_own_meshes(monkeypatch) -> None:  # noqa: ANN001
    task = _task(1, n_layers=4)
    expected = _own_meshes(task)
    run_rank_step(task)  # the key's groups recorded
    calls = []
    real = session_mode._group_map

    def shifted() -> dict:  # every group renamed: what sessions that create groups otherwise see
        calls.append(1)
        return {f"x{name}": ranks for name, ranks in real().items()}

    monkeypatch.setattr(session_mode, "_group_map", shifted)
    runs = []
    real_run = rank_mode._run_rank_step
    monkeypatch.setattr(rank_mode, "_run_rank_step",
                        lambda t, i, share_meshes: runs.append(share_meshes) or real_run(
                            t, i, share_meshes))
    assert _streams(run_rank_step(task)) == expected
    assert runs == [True, False] and calls  # the shared session was discarded, then run alone
    assert (task.rank, task.layout) not in session_mode._shared  # the key starts over


def test_a_session_that_raises_shares_nothing_with_later_ones() -> None:
    from simdist.mode.context import StepContext

    key = ("test", 0)
    try:
        with session_mode.rank_session(0, 2, StepContext(), key) as first:
            raise RuntimeError("the step failed")
    except RuntimeError:
        pass
    with session_mode.rank_session(0, 2, StepContext(), key) as second:
        pass
    assert second.token != first.token  # the failed session's caches are never handed on
    with session_mode.rank_session(0, 2, StepContext(), key) as third:
        pass
    assert third.token == second.token and third.consistent
