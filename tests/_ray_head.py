"""A real `ray start --head` on 127.0.0.1 for tests, isolated from every other Ray on the machine.

Its own temp dir (so the address file ``ray_current_cluster`` lands there, not in /tmp/ray), its
own GCS, dashboard, agent and Ray-client ports, its own process group. Stopped by SIGKILL to the
processes it started (its process group, then its descendants by pid): never `ray stop`, which
stops every Ray on the machine (other test sessions' too). Ray's own
``ray.cluster_utils.AutoscalingCluster`` calls ``ray stop --force`` in ``start()`` and
``shutdown()``, so the autoscaling test starts its head here instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .conftest import _free_port, wait_for_http

RAY = str(Path(sys.executable).with_name("ray"))
VENV_BIN = str(Path(sys.executable).parent)


@dataclass
class Head:
    address: str              # GCS address, 127.0.0.1:PORT (RAY_ADDRESS for drivers)
    dashboard: str | None     # http://127.0.0.1:PORT (the Jobs API), None without a dashboard
    temp_dir: Path
    log: Path
    env: dict                 # the environment the head (and so every Ray worker) started with

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, dead ones included: {"id", "alive", "resources"} (no driver
        is started: read with a GcsClient)."""
        code = ("import json, sys; from ray._raylet import GcsClient; from ray.core.generated import gcs_pb2;"
                "c = GcsClient(address=sys.argv[1]);"
                "print(json.dumps([{'id': i.hex(), 'alive': n.state == gcs_pb2.GcsNodeInfo.ALIVE,"
                " 'resources': dict(n.resources_total)} for i, n in c.get_all_node_info().items()]))")
        out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                             timeout=60, env=self.env)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s descendants (by pid: fake worker nodes the autoscaler spawned may sit in
    other sessions) and its process group, with SIGKILL at once: a test's cluster has nothing to
    save, and `ray start --block` took over 20 s to stop gracefully on SIGTERM (measured here)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    _signal_group_and_wait(proc, signal.SIGKILL)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _signal_group_and_wait(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (gone already: fine) and wait up to 20 s for it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def ray_head(num_cpus: int, *, dashboard: bool = False, autoscaling_config: dict | None = None,
             env_drop: tuple[str, ...] = (), env_extra: dict | None = None, timeout_s: float = 120):
    """Start a head with ``num_cpus`` logical CPUs; yields a ``Head``.

    ``autoscaling_config``: a cluster config (dict) for Ray's autoscaler with the fake multi-node
    provider (``RAY_FAKE_CLUSTER=1``; its ``provider.gcs_address`` is filled in here);
    ``env_drop``: variables the head must not inherit (e.g. AWS credentials a job must bring
    in its runtime_env); the venv's bin comes first on PATH, so a job's ``python`` is this one."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rdh", dir="/tmp"))  # short: Ray's sockets live under it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in env_drop and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    env.update(env_extra or {})
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
           "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    dash_url = None
    if dashboard:
        dash_port = _free_port()
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
        dash_url = f"http://127.0.0.1:{dash_port}"
    else:
        cmd += ["--include-dashboard=false"]
    if autoscaling_config is not None:
        config = json.loads(json.dumps(autoscaling_config))
        config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
        config_file = temp_dir / "autoscaling.yaml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        cmd.append(f"--autoscaling-config={config_file}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = temp_dir / "head.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address_file = temp_dir / "ray_current_cluster"
        deadline = time.time() + timeout_s
        while not (address_file.is_file() and address_file.read_text().strip().endswith(f":{port}")):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start --head did not come up: " + log.read_text()[-3000:])
            time.sleep(0.5)
        if dash_url and not wait_for_http(dash_url + "/api/version", proc, timeout_s=timeout_s, interval_s=0.5):
            raise RuntimeError("the dashboard (Jobs API) did not come up: " + log.read_text()[-3000:])
        yield Head(f"127.0.0.1:{port}", dash_url, temp_dir, log, env)
    finally:
        kill_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
