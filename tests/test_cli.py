"""The `simdist` command line as users run it (subprocesses), plus the run-directory writer.

Contract (DESIGN.md): exit 0 simulated (also when the plan does not fit), 2 invalid input with a
one-paragraph message naming the key and no traceback, 1 internal error; never a half-written
run directory. Bad input is rejected before Ray starts, so each such call costs only the
imports (~0.5 s for config errors, ~3 s when the model has to be built); they run two at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

PLAN_KEYS = {
    "world_size", "fits", "peak_bytes_max", "step_time_s", "mfu", "tokens_per_s",
    "tokens_per_s_per_gpu", "model_flops_per_step", "num_params", "rank_classes",
    "simulated_ranks", "sim_wall_s", "cache", "config", "simdist_version", "torch_version",
    "execution",
}
RANK_COLUMNS = {
    "rank", "node", "local_rank", "dp_replicate", "dp_shard", "cp", "tp", "pp", "ep", "class_id",
    "peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
    "other_bytes", "flops", "hbm_bytes", "comm_bytes", "compute_s", "comm_s", "exposed_comm_s",
    "bubble_s", "step_s", "fits",
}
RUN_FILES = {"plan.json", "ranks.parquet", "ops.parquet", "collectives.parquet", "memory.parquet",
             "kernels.parquet", "timeline.json"}
PHASE = re.compile(r"simdist: (planning|planned|starting|joining|executing|rebuilding|merging)\b")


def simdist_cmd() -> list[str]:
    exe = shutil.which("simdist")
    return [exe] if exe else [sys.executable, "-m", "simdist.cli"]


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    # A local Ray of its own: never join whatever RAY_ADDRESS the test runner has.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SIMDIST_DEBUG")}
    return subprocess.run(simdist_cmd() + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------
# Bad input: exit 2, one short paragraph naming the key, no traceback, no run directory.

YAML_SYNTAX_ERROR = "model: {preset: llama3-debug\ntraining: [1, 2\n"
UNKNOWN_SECTION = "model: {preset: llama3-debug}\noptimiser: {lr: 0.001}\n"
UNKNOWN_TRAINING_KEY = "model: {preset: llama3-debug}\ntraining: {seq_len: 256, lr: 0.001}\n"

# id: (config file text or None for quickstart or "missing", extra args, words stderr must name)
BAD_INPUT = {
    "unknown-preset": (None, ["--set", "model.preset=llama9"], ["model.preset", "llama3-8b"]),
    "unknown-model-field": (None, ["--set", "model.foo=1"], ["model.foo", "n_heads"]),
    "bad-dtype": (None, ["--set", "training.dtype=fp8"], ["training.dtype", "bf16"]),
    "tp-not-dividing-kv-heads": (None, ["--set", "parallel.tp=8"], ["parallel.tp", "n_kv_heads"]),
    "pp-more-stages-than-layers": (None, ["--set", "parallel.pp=8"], ["parallel.pp", "layers"]),
    "ep-not-supported": (None, ["--set", "parallel.ep=2"], ["parallel.ep"]),
    "degree-product": (None, ["--set", "parallel.dp_shard=3"], ["parallel", "dp_shard", "world size 8"]),
    "dp-shard-not-dividing": (None, ["--set", "parallel.dp_replicate=3"], ["parallel.dp_shard"]),
    "global-batch": (None, ["--set", "training.global_batch=33"], ["training.global_batch"]),
    "unknown-gpu": (None, ["--set", "cluster.gpu=h900"], ["cluster.gpu", "h100-sxm"]),
    "custom-gpu-incomplete": (None, ["--set", "cluster.gpu={name: tiny, hbm_gb: 1}"],
                              ["cluster.gpu.bf16_tflops"]),
    "missing-file": ("missing", [], ["config", "not found", "nope.yaml"]),
    "yaml-syntax": (YAML_SYNTAX_ERROR, [], ["config", "YAML", "line 2"]),
    "set-without-equals": (None, ["--set", "parallel.dp_shard"], ["--set", "KEY=VALUE"]),
    "unknown-section-set": (None, ["--set", "optimiser.lr=1"], ["optimiser", "training"]),
    "unknown-section-file": (UNKNOWN_SECTION, [], ["optimiser", "training"]),
    "unknown-training-key": (UNKNOWN_TRAINING_KEY, [], ["training.lr", "seq_len"]),
    "heads-not-dividing-dim": (None, ["--set", "model.n_heads=7"], ["model.n_heads"]),
    "seq-len-over-max-llama": (None, ["--set", "model.max_seq_len=1024"], ["training.seq_len", "1024"]),
    "seq-len-over-max-gpt": (None, ["--set", "model.preset=gpt-debug", "--set", "model.max_seq_len=1024"],
                             ["training.seq_len", "1024"]),
    "negative-nodes": (None, ["--set", "cluster.nodes=-1"], ["cluster.nodes", ">= 1"]),
    "zero-micro-batch": (None, ["--set", "training.micro_batch=0"], ["training.micro_batch"]),
    "workers-not-a-number": (None, ["--workers", "two"], ["--workers"]),
    "unknown-flag": (None, ["--frobnicate"], ["unrecognized arguments", "--frobnicate"]),
}


# Through the real console script (exit status, stderr, no default run directory), one case
# per way bad input leaves the CLI with exit 2: a ConfigError while loading (the file; also no
# runs/<stem>/ appears), a ConfigError from the planning check (after the model is built), and
# argparse's own error. The other cases take one of those paths too: they are the config
# validation of test_config.py seen through the CLI, checked in-process by main() with the
# same assertions (unknown-flag only by subprocess: argparse exits the process).
SUBPROCESS_CASES = ("missing-file", "degree-product", "unknown-flag")


def _bad_args(case: str, cwd: Path) -> list[str]:
    text, extra, _ = BAD_INPUT[case]
    if text is None:
        config = QUICKSTART
    elif text == "missing":
        config = cwd / "nope.yaml"
    else:
        config = cwd / "config.yaml"
        config.write_text(text)
    if case == "missing-file":  # also: no default run directory (runs/<stem>/) appears
        return ["run", str(config), *extra]
    return ["run", str(config), "--out", str(cwd / "nested" / "run"), *extra]


def _out(case: str, cwd: Path) -> Path:
    return cwd / "runs" if case == "missing-file" else cwd / "nested" / "run"


def _run_bad(case: str, root: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    cwd = root / case
    cwd.mkdir()
    return run_cli(_bad_args(case, cwd), cwd=cwd), cwd, _out(case, cwd)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {case: pool.submit(_run_bad, case, root) for case in SUBPROCESS_CASES}
        return {case: f.result() for case, f in futures.items()}


def _check_bad(case: str, rc: int, out_text: str, err_text: str, cwd: Path, out: Path) -> None:
    err = err_text.strip()
    assert rc == 2, (rc, out_text, err_text)
    assert "Traceback" not in err_text
    assert out_text == ""
    assert err and "\n\n" not in err and len(err) < 700, err  # one short paragraph
    for word in BAD_INPUT[case][2]:
        assert word in err, f"{word!r} not in {err!r}"
    assert not out.exists()
    # Nothing else either: not the run directory's parent (`nested/`), no temp directories.
    assert sorted(p.name for p in cwd.iterdir()) in ([], ["config.yaml"]), list(cwd.iterdir())
    assert not (REPO / "runs" / cwd.name).exists()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input(bad_runs, case):
    proc, cwd, out = bad_runs[case]
    _check_bad(case, proc.returncode, proc.stdout, proc.stderr, cwd, out)


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c not in SUBPROCESS_CASES])
def test_bad_input_in_process(case, tmp_path, capsys, monkeypatch):
    from simdist.cli import main

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    cwd = tmp_path / case
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = main(_bad_args(case, cwd))
    captured = capsys.readouterr()
    _check_bad(case, rc, captured.out, captured.err, cwd, _out(case, cwd))


# ------------------------------------------------------------------------------------------
# Simulated: exit 0, a complete run directory; a plan that does not fit is a result too.


def test_quickstart_run(tmp_path):
    out = tmp_path / "quick"
    proc = run_cli(["run", "configs/quickstart.yaml", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "world 8" not in proc.stdout  # --quiet: no summary
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"report.html"}  # the dashboard too
    assert not [p for p in tmp_path.iterdir() if p.name != "quick"]  # no temp dirs left beside

    plan = json.loads((out / "plan.json").read_text())
    assert PLAN_KEYS <= plan.keys(), PLAN_KEYS - plan.keys()
    assert {"hits", "misses", "bypasses", "size"} <= plan["cache"].keys()
    assert {"ray_address", "nodes", "actors"} <= plan["execution"].keys()
    assert plan["execution"]["ray_address"] is None  # a local Ray, started and stopped
    assert plan["execution"]["nodes"] == 1 and plan["execution"]["actors"] >= 1
    assert plan["world_size"] == 8 and plan["fits"] is True
    assert plan["rank_classes"] == plan["simulated_ranks"] == 1
    assert plan["config"]["model"]["preset"] == "llama3-debug"
    assert plan["config"]["parallel"]["dp_shard"] == 8  # resolved from -1
    assert plan["model_flops_per_step"] > 0 and plan["num_params"] > 0

    ranks = pq.read_table(out / "ranks.parquet")
    assert set(ranks.column_names) == RANK_COLUMNS and ranks.num_rows == 8
    assert ranks["rank"].to_pylist() == list(range(8))
    for name in ("ops", "collectives", "memory"):
        table = pq.read_table(out / f"{name}.parquet")
        assert table.num_rows > 0 and "class_id" in table.column_names


def test_plan_that_does_not_fit_is_a_result(tmp_path):
    # 1.2 GB of HBM, less the 1 GiB reserved: ~126 MB for a step that needs several times that.
    # No --out: the default run directory is runs/<config stem>/ under the working directory.
    # Also: a cache_dir that is a file costs the cache (one warning line), not the run.
    tiny = "cluster.gpu={name: tiny, bf16_tflops: 100, hbm_gb: 1.2, hbm_tb_s: 1, nvlink_gb_s: 100}"
    a_file = tmp_path / "cache-is-a-file"
    a_file.write_text("")
    proc = run_cli(["run", str(QUICKSTART), "--set", tiny,
                    "--set", f"simulation.cache_dir={a_file}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fits false" in proc.stdout  # the summary line
    warned = [line for line in proc.stderr.splitlines() if str(a_file) in line]
    rest = [line for line in proc.stderr.strip().splitlines() if line not in warned]
    assert len(warned) == 1 and all(PHASE.match(line) for line in rest), proc.stderr
    # A console that informs, also when stderr is not a terminal: one line per phase, in order.
    phases = [PHASE.match(line).group(1) for line in rest]
    assert phases == ["planning", "planned", "starting", "executing", "merging"], \
        proc.stderr
    out = tmp_path / "runs" / "quickstart"
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["cache"]["warnings"]) == 1 and str(a_file) in plan["cache"]["warnings"][0]
    assert plan["fits"] is False
    assert plan["peak_bytes_max"] > plan["memory_limit_bytes"]
    assert plan["config"]["cluster"]["gpu"]["name"] == "tiny"
    assert not any(pq.read_table(out / "ranks.parquet")["fits"].to_pylist())


# ------------------------------------------------------------------------------------------
# Internal errors (in-process, simulate patched out): exit 1, short message, no run directory.


def test_internal_error_exit_1(tmp_path, monkeypatch, capsys):
    import simdist.coordinator
    from simdist.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("worker died")

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    monkeypatch.setattr(simdist.coordinator, "simulate", boom)
    out = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "worker died" in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# ClusterPlan.write: atomic (built beside the target, then renamed into place).


def tiny_plan(tag: str):
    from simdist.plan import ClusterPlan

    t = pa.table({"class_id": pa.array([0], pa.int32()), "x": [1]})
    return ClusterPlan(summary={"tag": tag}, ranks=pa.table({"rank": [0]}), ops=t, collectives=t,
                       memory=t, kernels=t)


def old_run(parent: Path) -> Path:
    out = parent / "run"
    out.mkdir(parents=True)
    (out / "plan.json").write_text('{"tag": "old", "simdist_version": "0.1.0"}')
    (out / "stale.txt").write_text("from an earlier run")
    return out


def fail_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make `module.name` raise on its n-th call (1-based); earlier calls go through."""
    orig = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_write_creates_run_dir(tmp_path):
    out = tiny_plan("new").write(tmp_path / "a" / "run")
    assert out == (tmp_path / "a" / "run").resolve()
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert json.loads((out / "plan.json").read_text()) == {"tag": "new"}
    assert [p.name for p in out.parent.iterdir()] == ["run"]


def test_write_run_dir_permissions(tmp_path):
    # Built in a mkdtemp directory (private, 0700), but readable like any other directory.
    out = tiny_plan("new").write(tmp_path / "run")
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    import simdist.plan

    fail_on_call(monkeypatch, simdist.plan.pq, "write_table", 3)  # ranks, ops written; then fail
    with pytest.raises(OSError):
        tiny_plan("new").write(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_run_whole(tmp_path):
    out = old_run(tmp_path)
    tiny_plan("new").write(out)
    assert {p.name for p in out.iterdir()} == RUN_FILES  # stale.txt went with the old run
    assert json.loads((out / "plan.json").read_text()) == {"tag": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def assert_write_fails_keeping_old_run(tmp_path: Path, out: Path) -> None:
    with pytest.raises(OSError):
        tiny_plan("new").write(out)
    assert {p.name for p in out.iterdir()} == {"plan.json", "stale.txt"}
    assert json.loads((out / "plan.json").read_text())["tag"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_write_failure_keeps_existing_run(tmp_path, monkeypatch):
    import simdist.plan

    out = old_run(tmp_path)
    fail_on_call(monkeypatch, simdist.plan.pq, "write_table", 2)
    assert_write_fails_keeping_old_run(tmp_path, out)


def test_write_failure_at_the_swap_keeps_existing_run(tmp_path, monkeypatch):
    # The old run is moved aside, then the new one renamed into place: if that second rename
    # fails, the old run must come back (not stay hidden in a temp directory).
    import simdist.plan

    out = old_run(tmp_path)
    fail_on_call(monkeypatch, simdist.plan.os, "replace", 2)
    assert_write_fails_keeping_old_run(tmp_path, out)


# ------------------------------------------------------------------------------------------
# Unattended runs (issue #13): every check in-process through cli.main where no real process
# is the point; each fails before anything is simulated (simulate is patched to fail loudly).


@pytest.fixture
def no_simulation(monkeypatch):
    """cli.main with simulate replaced: a test that reaches it has failed to stop early."""
    import simdist.coordinator

    def must_not_run(*args, **kwargs):
        raise AssertionError("simulated although the input is bad")

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(simdist.coordinator, "simulate", must_not_run)


def run_main(capsys, *args: str) -> tuple[int, str]:
    from simdist.cli import main

    code = main(["run", str(QUICKSTART), *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\x1b" not in err
    return code, err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_replaces_only_a_run_dir(tmp_path, capsys, no_simulation):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "plan.json").write_text('{"not": "simdist"}')  # a plan.json without the marker
    before = tree(project)
    code, err = run_main(capsys, "--out", str(project))
    assert code == 2 and "--out" in err and "not a simdist run" in err, err
    assert tree(project) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    code, err = run_main(capsys, "--out", str(a_file))
    assert code == 2 and "--out" in err and "not a directory" in err
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "project"]


def test_out_in_a_place_that_cannot_be_written(tmp_path, capsys, no_simulation):
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, err = run_main(capsys, "--out", str(a_file / "x" / "run"))  # under a regular file
    assert code == 2 and "--out" in err and "not a directory" in err, err
    if os.geteuid() != 0:  # root writes into 0o555 directories
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            code, err = run_main(capsys, "--out", str(ro / "run"))
            assert code == 2 and "--out" in err and "not writable" in err, err
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o755)


@pytest.mark.parametrize("value", ["0", "-3", "abc", "2.5"])
def test_workers_flag_follows_the_config_rule(capsys, no_simulation, value):
    from simdist.config import ConfigError, load_config

    code, err = run_main(capsys, "--workers", value, "--out", "/nonexistent-never-written")
    assert code == 2 and "--workers" in err and "auto or an integer >= 1" in err, err
    with pytest.raises(ConfigError) as info:  # the same words as simulation.workers
        load_config({}, [f"simulation.workers={value}"])
    assert info.value.message in err


@pytest.mark.parametrize("override, key, limit", [
    ("cluster.nodes=1e9", "cluster.nodes", "1048576"),
    ("cluster.nodes=1000000000", "cluster.nodes", "1048576"),
    ("cluster.nodes=200000", "cluster.nodes", "1,048,576"),  # 200000 x 8 GPUs
    ("cluster.gpus_per_node=65", "cluster.gpus_per_node", "64"),
    ("training.seq_len=16777217", "training.seq_len", "16777216"),
    ("training.global_batch=2097152", "training.global_batch", "65,536"),  # micro-batches
    ("model.n_layers=4097", "model.n_layers", "4096"),
    ("model.dim=10000000000000", "model.dim", "1048576"),
    ("model.vocab_size=abc", "model.vocab_size", "16777216"),
    ("cluster.gpu={name: x, bf16_tflops: .inf, hbm_gb: 1, hbm_tb_s: 1, nvlink_gb_s: 1}",
     "cluster.gpu.bf16_tflops", "10000000"),
])
def test_limits_name_the_key_and_the_limit(capsys, no_simulation, override, key, limit):
    code, err = run_main(capsys, "--set", override, "--out", "/nonexistent-never-written")
    assert code == 2 and key in err and limit in err, err
    assert "MemoryError" not in err


def test_internal_error_without_a_message_names_its_type_and_place(tmp_path, monkeypatch, capsys):
    import simdist.coordinator

    def empty(*args, **kwargs):
        raise AssertionError()

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    monkeypatch.setattr(simdist.coordinator, "simulate", empty)
    code, err = run_main(capsys, "--out", str(tmp_path / "run"))
    assert code == 1 and "internal error: AssertionError at " in err and "test_cli.py:" in err, err


def ray_task_error():
    from ray.exceptions import RayTaskError

    remote_tb = ('Traceback (most recent call last):\n  File "/x/simdist/mode/rank.py", line 7, '
                 'in execute_unit\n\x1b[36mray::RankWorker.simulate()\x1b[39m\nValueError: '
                 'bad shape\n')
    return RayTaskError("RankWorker.simulate", remote_tb, ValueError("bad shape"))


@pytest.mark.parametrize("debug", [False, True])
def test_ray_actor_error_is_one_plain_line(tmp_path, monkeypatch, capsys, debug):
    import simdist.coordinator

    def remote_failure(*args, **kwargs):
        raise ray_task_error()

    monkeypatch.delenv("SIMDIST_DEBUG", raising=False)
    monkeypatch.setattr(simdist.coordinator, "simulate", remote_failure)
    from simdist.cli import main

    code = main(["run", str(QUICKSTART), "--out", str(tmp_path / "run"), "--quiet",
                 *(["--debug"] * debug)])
    err = capsys.readouterr().err
    assert code == 1 and "\x1b" not in err
    assert "simdist: internal error: ValueError: bad shape" in err, err
    if debug:
        assert "Traceback" in err and "rank.py" in err
    else:
        assert err.count("\n") == 1 and "Traceback" not in err and "--debug" in err


def test_entrypoint_needs_trust_code(tmp_path, monkeypatch, capsys, no_simulation):
    import sys as _sys

    marker = tmp_path / "ran"
    (tmp_path / "evil_entry.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef build():\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    for entry, extra in (("os:system", ["--set", f"model.kwargs={{command: 'touch {marker}'}}"]),
                         ("evil_entry:build", [])):
        code, err = run_main(capsys, "--set", f"model.entrypoint={entry}", *extra, "--out", out)
        assert code == 2 and "model.entrypoint" in err and "--trust-code" in err, err
        assert not marker.exists() and "evil_entry" not in _sys.modules
    # a config cannot grant it to itself
    code, err = run_main(capsys, "--set", "model.entrypoint=evil_entry:build", "--set",
                         "simulation.trust_code=true", "--out", out)
    assert code == 2 and "simulation.trust_code" in err and not marker.exists()
    from simdist.config import load_config, require_trusted_code

    require_trusted_code(load_config({"model": {"entrypoint": "evil_entry:build"}}, trust_code=True))
    assert not marker.exists()  # allowing is not importing


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_unreachable_ray_address_fails_fast(tmp_path, monkeypatch, capfd, via):
    import time

    from simdist.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["run", str(QUICKSTART), "--out", str(tmp_path / "run"), "--quiet"]
    if via == "--address":
        args += ["--address", "127.0.0.1:1"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    t0 = time.monotonic()
    code = main(args)
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err  # file-descriptor level: Ray's C++ warnings would show here
    assert code == 2 and elapsed < 15, (code, elapsed, err)
    assert "127.0.0.1:1" in err and via in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_version(capsys):
    from simdist.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("simdist 0.1.0") and "torch 2." in out


def test_cache_commands_cover_the_layer_and_plan_stores(tmp_path, capsys):
    from simdist.cli import main

    store = tmp_path / "cache" / "layers" / "memo1-torch-x"
    store.mkdir(parents=True)
    (store / "ab.arrow").write_bytes(b"\0" * 1000)
    plans = tmp_path / "cache" / "plans" / "plan1-torch-x"
    for name in ("cd", "ef"):
        (plans / name).mkdir(parents=True)
        (plans / name / "plan.json").write_bytes(b"\0" * 300)
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "layer store memo1-torch-x" in out and "entries 1" in out and "1000 bytes" in out
    assert "plan store plan1-torch-x" in out and "entries 2" in out and "600 bytes" in out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "plan store" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "layers").exists()
    assert not (tmp_path / "cache" / "plans").exists()
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["cache", "info", "--cache-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a file" in err and "Traceback" not in err


def test_sigterm_stops_a_run_cleanly(tmp_path):
    """A real process (the point is the signal): SIGTERM once the rank actors are starting ->
    exit 143, one line, no stack dump, no run directory, no Ray process left."""
    import signal
    import time

    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SIMDIST_DEBUG")}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "simdist.cli", "run", str(QUICKSTART), "--out",
                             str(out), "--no-cache"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        me, kids, deadline = psutil.Process(proc.pid), [], time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                kids = me.children(recursive=True)
                if any("RankWorker" in " ".join(k.cmdline()) for k in kids):
                    break
            except psutil.Error:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "*** SIGTERM" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "simdist: stopped by SIGTERM; nothing written"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    left = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    for _ in range(50):  # Ray's processes go on their own, give them a moment
        if not left:
            break
        time.sleep(0.2)
        left = [k for k in left if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not left, [k.cmdline() for k in left]
