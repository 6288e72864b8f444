"""Real Ray faults through tiny entrypoint models (tests/fault_models.py), as users meet them:
`simdist run` in a subprocess with a local Ray of its own (issue #13). A model that raises, an
actor process that dies once (Ray restarts it and retries the call), a rank that hangs, and
the Ray node's own processes killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SIMDIST_DEBUG")}
    # the actors import fault_models: Ray's workers inherit the driver's environment
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _config(tmp_path: Path, name: str, fault: str, **extra) -> Path:
    kwargs = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                       for k, v in dict(fault=fault, **extra).items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(f'model: {{entrypoint: "fault_models:tiny", kwargs: {{{kwargs}}}}}\n'
                    "training: {seq_len: 64}\ncluster: {gpus_per_node: 2}\n"
                    "simulation: {rank_timeout_s: 120}\n")
    return path


def _run(config: Path, out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simdist.cli", "run", str(config), "--out",
                           str(out), "--trust-code", "--no-cache", *extra], cwd=config.parent,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_plain_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "\x1b" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_model_that_raises_is_one_plain_line(tmp_path):
    out = tmp_path / "run"
    proc = _run(_config(tmp_path, "raise", "raise"), out, "--quiet")
    assert proc.returncode == 1
    line = _one_plain_line(proc.stderr)
    assert line.startswith("simdist: internal error: ValueError: the user model rejects this "
                           "input"), line
    assert "ray::" not in line and not out.exists()


def test_op_fake_tensors_cannot_run_is_one_line_naming_op_and_module(tmp_path):
    proc = _run(_config(tmp_path, "item", "item"), tmp_path / "run", "--quiet")
    assert proc.returncode == 1
    line = _one_plain_line(proc.stderr)
    assert line.startswith("simdist: cannot simulate the model: op aten._local_scalar_dense"
                           ".default in module layers.0 cannot run on fake tensors"), line
    assert "register_fake" in line


def test_actor_process_that_dies_once_is_retried(tmp_path):
    """The first actor process to run forward os._exit()s; Ray restarts the actor
    (max_restarts) and retries the call (max_task_retries): the run completes, its rows equal
    a clean run's."""
    marker = tmp_path / "died-once"
    dying = _run(_config(tmp_path, "dies", "exit_once", marker=str(marker)), tmp_path / "dies",
                 "--quiet")
    assert dying.returncode == 0, dying.stderr
    assert marker.exists()  # it did die once
    clean = _run(_config(tmp_path, "clean", "none"), tmp_path / "clean", "--quiet")
    assert clean.returncode == 0, clean.stderr
    assert pq.read_table(tmp_path / "dies" / "ranks.parquet").equals(
        pq.read_table(tmp_path / "clean" / "ranks.parquet"))


def test_hanging_rank_times_out(tmp_path):
    config = _config(tmp_path, "hang", "hang", seconds=3600)
    t0 = time.monotonic()
    proc = _run(config, tmp_path / "run", "--quiet", "--set", "simulation.rank_timeout_s=5",
                timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1 and elapsed < 60, (elapsed, proc.stderr)
    line = _one_plain_line(proc.stderr)
    assert "rank 0" in line and "simulation.rank_timeout_s = 5 s" in line, line


def test_the_next_call_is_not_stuck_behind_a_hung_actor():
    """ActorPool on a real Ray: a call that times out leaves its actor busy (an actor runs one
    call at a time); the pool replaces it, so the next call runs at once."""
    import asyncio

    import ray

    from conftest import make_task
    from simdist.families import entrypoint_spec
    from simdist.workers.pool import ActorPool, RankTimeout, start_workers

    hang = make_task(entrypoint_spec("fault_models:tiny", dict(fault="hang", seconds=3600)),
                     seq_len=64)
    ok = make_task(entrypoint_spec("fault_models:tiny", {}), seq_len=64)

    async def main() -> tuple:
        pool = ActorPool(start_workers(1), timeout_s=10)
        try:
            first = pool.execute(hang)
            second = pool.execute(ok)
            t0 = time.monotonic()
            with pytest.raises(RankTimeout):
                await first
            trace = await asyncio.wait_for(second, 60)
            return trace, time.monotonic() - t0
        finally:
            await pool.close()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": _env()["PYTHONPATH"]}})
    try:
        trace, elapsed = asyncio.run(main())
    finally:
        ray.shutdown()
    assert trace.peak_bytes > 0 and elapsed < 60


@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_killing_the_ray_node_fails_cleanly(tmp_path, victim):
    """The local Ray's raylet or GCS SIGKILLed while a rank runs: exit 1 within seconds, one
    line naming what died (without the watchdog: a minute, then Ray's C++ core ends the
    process with its own message; FIELD-NOTES saw 13 minutes)."""
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    config = _config(tmp_path, "slow", "sleep", seconds=120)
    proc = subprocess.Popen([sys.executable, "-m", "simdist.cli", "run", str(config), "--out",
                             str(tmp_path / "run"), "--trust-code", "--no-cache", "--quiet"],
                            cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        me, deadline, target = psutil.Process(proc.pid), time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None and target is None:
            try:
                kids = me.children(recursive=True)
                if any("RankWorker.simulate" in " ".join(k.cmdline()) for k in kids):
                    target = next(k for k in kids if victim in " ".join(k.cmdline()[:1]))
            except (psutil.Error, StopIteration):
                pass
            time.sleep(0.2)
        assert target is not None, proc.communicate(timeout=5)
        t0 = time.monotonic()
        os.kill(target.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and elapsed < 45, (proc.returncode, elapsed, stderr)
    line = _one_plain_line(stderr)
    assert line.startswith(f"simdist: Ray failed: the local Ray's {victim} (pid {target.pid}) "
                           "died during the run"), line
    assert not (tmp_path / "run").exists()


def _ray_processes_of_this_node(name: str) -> int:
    """Worker processes called `ray::<name>` whose parent is this driver's raylet."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        n += ppid == raylet and cmd.startswith(f"ray::{name}".encode())
    return n


def test_actors_that_cannot_start_fail_within_the_bound_naming_why(tmp_path):
    """Every CPU of the Ray cluster held by another job: the rank actors stay pending. The run
    fails after one rank_timeout_s, saying the actor never started, and leaves no process of
    its own behind (the dispatch cache's service is ended too)."""
    import ray

    from simdist.config import load_config
    from simdist.coordinator import simulate
    from simdist.workers.pool import RankTimeout

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        hog = ray.remote(num_cpus=1)(type("Hog", (), {"ping": lambda self: 1})).remote()
        ray.get(hog.ping.remote())
        cfg = load_config({
            "model": {"preset": "llama3-debug", "n_layers": 2},
            "training": {"seq_len": 64, "micro_batch": 1},
            "parallel": {"dp_shard": 2},
            "cluster": {"gpu": "h100-sxm", "gpus_per_node": 2, "nodes": 1},
            "simulation": {"rank_timeout_s": 5, "cache_dir": str(tmp_path / "cache")},
        })
        t0 = time.monotonic()
        with pytest.raises(RankTimeout) as err:
            simulate(cfg)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # ray.kill is asynchronous
        left = _ray_processes_of_this_node("CacheService")
    finally:
        ray.shutdown()
    assert elapsed < 30, elapsed
    assert not err.value.started
    assert "actor did not start within simulation.rank_timeout_s = 5 s" in str(err.value)
    assert left == 0
