"""Ray start-up as a new user meets it: a `ray start --head` already running on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._ray_head import kill_tree
from .conftest import _free_port


@pytest.fixture
def running_head(tmp_path):
    """A real `ray start --head` on 127.0.0.1 with 1 CPU; it writes the machine's cluster file
    (/tmp/ray/ray_current_cluster), which a bare ray.init() would join. Stopped by killing its own
    processes only (never `ray stop`, which would stop every Ray on the machine)."""
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address_file = Path("/tmp/ray/ray_current_cluster")
    deadline = time.time() + 120
    while time.time() < deadline:
        if address_file.is_file() and address_file.read_text().strip().endswith(f":{port}"):
            break
        if proc.poll() is not None:
            pytest.fail("ray start --head exited: " + (tmp_path / "head.log").read_text()[-2000:])
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not come up in 120 s")
    yield f"127.0.0.1:{port}"
    kill_tree(proc)  # SIGKILL: `ray start --block` took the whole 30 s it was given to stop on SIGTERM
    # What `ray stop` does too: a cluster file naming a dead head makes every later Ray Train run in
    # this machine's tests wait 12 s at its end (Ray Train's PlacementGroupCleaner asks the state API,
    # which reads this file, and waits 40 s on the dead address).
    if address_file.is_file() and address_file.read_text().strip().endswith(f":{port}"):
        address_file.unlink()


def _init_ray_in_subprocess(env_extra: dict) -> dict:
    code = ("import json, logging, ray; logging.basicConfig(level=logging.INFO);"
            "from raydistill.runtime import init_ray; init_ray();"
            "print(json.dumps({'cpus': ray.cluster_resources().get('CPU'),"
            " 'address': ray.get_runtime_context().gcs_address}))")
    env = dict(os.environ, **env_extra)
    if "RAY_ADDRESS" not in env_extra:
        env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["log"] = out.stderr
    return result


def test_a_running_head_does_not_break_a_local_run(running_head):
    """Before: every stage failed in 2 s with "When connecting to an existing cluster, num_cpus and
    num_gpus must not be provided". Now a run without RAY_ADDRESS starts its own Ray, and says so."""
    got = _init_ray_in_subprocess({})
    assert got["cpus"] == max(8, os.cpu_count() or 1)  # its own instance, not the 1-CPU head
    port = running_head.rsplit(":", 1)[1]
    assert not got["address"].endswith(f":{port}")
    assert "private local Ray" in got["log"] and "RAY_ADDRESS" in got["log"]
    # RAY_ADDRESS joins the running cluster on purpose, and says so
    joined = _init_ray_in_subprocess({"RAY_ADDRESS": running_head})
    assert joined["cpus"] == 1 and joined["address"].endswith(f":{port}")  # Ray reports the node's own IP
    assert f"connected to the Ray cluster at RAY_ADDRESS={running_head}" in joined["log"]


def test_test_server_ports_avoid_ephemeral_and_ray_worker_ports_and_split_between_workers(monkeypatch):
    """The fixtures' ports (vLLM server, moto, Ray heads, Serve) come from 20000-32767, where neither
    ``bind(0)`` nor Ray's workers (10002-19999) land, and two pytest-xdist workers draw disjoint ports
    (a CI run lost its vLLM server to "Address already in use" when both came from ``bind(0)``)."""
    from . import conftest

    drawn = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setattr(conftest, "_PORTS", [])
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        drawn[worker] = [conftest._free_port() for _ in range(40)]
        assert len(set(drawn[worker])) == 40, "a port handed out twice"
    assert all(20000 <= p < 26384 for p in drawn["gw0"]) and all(26384 <= p < 32768 for p in drawn["gw1"])
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not any(lo <= p <= hi for ports in drawn.values() for p in ports)
