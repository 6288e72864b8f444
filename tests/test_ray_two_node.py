"""A real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: head + one node, one
CPU each, two raylets talking over the host's own address), joined by the CLI in a subprocess with
`--address`: both nodes must simulate a rank class.

Own module so that no Ray is initialised in this process (the driver is the CLI subprocess).
The nodes keep Ray's default node IP: with `node_ip_address="127.0.0.1"` a driver started
elsewhere (the CLI) still picks the host's routable IP for itself and waits for the GCS there
until it times out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import ray  # a hard dependency (pyproject): missing, the tests must fail, not skip
from ray.cluster_utils import Cluster  # noqa: E402

# Two classes (vocab 2050 over dp_shard 8: seven shards of 257 rows, one of 251): with two
# actors, one per node, each node simulates one class.
CONFIG = """\
model: {preset: llama3-debug, vocab_size: 2050}
training: {seq_len: 128, micro_batch: 1}
parallel: {dp_shard: -1}
cluster: {gpu: h100-sxm, gpus_per_node: 8, nodes: 1}
"""


def simdist_cmd() -> list[str]:
    exe = shutil.which("simdist")
    return [exe] if exe else [sys.executable, "-m", "simdist.cli"]


@pytest.fixture(scope="module")
def two_nodes():
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def test_cli_on_two_node_cluster(two_nodes, tmp_path):
    config = tmp_path / "two_classes.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        simdist_cmd() + ["run", str(config), "--address", two_nodes.address, "--workers", "2",
                         "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    plan = json.loads((out / "plan.json").read_text())
    ex = plan["execution"]
    assert ex["ray_address"] == two_nodes.address
    assert ex["actors"] == 2
    assert ex["nodes"] == 2, ex  # each node simulated a class
    assert plan["rank_classes"] == 2 and plan["simulated_ranks"] == 2
    assert plan["world_size"] == 8 and plan["fits"] is True
