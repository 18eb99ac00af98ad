"""A local output_dir is refused wherever the run's workers may sit on other machines: in a Ray job,
and on a connected cluster (RAY_ADDRESS) of several nodes or with an autoscaler; one rule
(``jobmode.output_problem``) for both paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from raydistill.jobmode import output_problem


def test_a_connected_multi_node_cluster_refuses_a_local_output_dir():
    assert output_problem("/data/runs/x", False, None) is None  # not connected yet: decided later
    assert output_problem("/data/runs/x", False, None, nodes=1) is None  # one machine
    msg = output_problem("/data/runs/x", False, None, nodes=3)
    assert msg and "'/data/runs/x' is a local path" in msg and "has 3 nodes" in msg, msg
    assert "output_dir=s3://" in msg and "storage.shared_local=true" in msg
    scaling = output_problem("runs/x", False, None, nodes=1, may_add_nodes=True)
    assert scaling and "an autoscaler that may add more" in scaling, scaling
    assert output_problem("/mnt/efs/runs/x", True, None, nodes=3) is None  # a shared mount, declared
    assert output_problem("s3://bucket/runs/x", False, None, nodes=3) is None
    # the job rule is unchanged: a job's driver is refused a local path whatever the node count
    assert output_problem("/data/runs/x", False, "raysubmit_1", nodes=1)


def test_a_one_node_cluster_passes_the_check(ray_local, tmp_path):
    """The real check on a live (one-node, no autoscaler) Ray: it counts the nodes and lets a local
    output_dir through."""
    from raydistill.config import Config
    from raydistill.resources import _check_shared_storage

    _check_shared_storage(Config(output_dir=str(tmp_path / "run")))


_TWO_NODES = textwrap.dedent("""
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster
    from raydistill.config import Config
    from raydistill.resources import ResourceError, ensure_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": sys.argv[1]})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    out = {}
    try:
        for name, sets in (("local", {}), ("shared", {"storage": {"shared_local": True}})):
            cfg = Config.model_validate({"output_dir": sys.argv[2], "train": {"workers": 1}, **sets})
            try:
                ensure_ray(cfg, ("train",))
                out[name] = None
            except ResourceError as e:
                out[name] = str(e)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_two_node_cluster_refuses_a_local_output_dir(tmp_path):
    """``raydistill train`` with RAY_ADDRESS on a real 2-node cluster (``ray.cluster_utils.Cluster``,
    in its own process): refused with the fix named; accepted with storage.shared_local."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # the cluster's temp dir holds its sockets, whose paths may not pass 107 bytes: a short folder
    # (pytest-xdist's tmp_path, /tmp/pytest-of-root/pytest-N/popen-gw0/test_a_two_node_.../, was too long)
    ray_tmp = tempfile.mkdtemp(prefix="rds", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, "-c", _TWO_NODES, ray_tmp, str(tmp_path / "run")],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["local"] and "has 2 nodes" in out["local"] and "storage.shared_local=true" in out["local"], out
    assert out["shared"] is None, out
