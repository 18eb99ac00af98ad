"""Generation on an autoscaling cluster: Ray's real autoscaler (v1, the one `ray up` runs) with
the fake multi-node provider, which starts extra raylets on this machine as "nodes".

The head has 1 CPU; `jobs/generate.py`, submitted through the Jobs API, asks for 2 vLLM engine
replicas × 1 CPU + the prompt tokenizer (0.25 CPU) + 1 CPU for Ray Data's tasks, so the autoscaler
must add `cpu_node` workers (2 CPU each, at most 2). RAYDISTILL_AUTOSCALER_CONFIG (in the job's
runtime env) points the precheck at the autoscaler's config (on a `ray up` head it reads
~/ray_bootstrap_config.yaml).

Not ``ray.cluster_utils.AutoscalingCluster`` itself: its ``start()`` and ``shutdown()`` run
``ray stop --force`` (every Ray on the machine), and it reads the provider's example.yaml, which
the Ray 2.60 wheel does not ship; the same config is written here, with the provider loaded as
an ``external`` module so that no example.yaml is needed.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml

from raydistill.config import load
from raydistill.data import load_prompts

from ._ray_head import ray_head
from .conftest import mixed_prompts, write_jsonl
from .helpers import REPO, job_runtime_env, wait_for_job

# 30 s. With 12 s, a loaded 2-core machine (CI beside other jobs) left a gap that long between two
# Ray Data reads of generate's prompt step: the autoscaler released the node that Ray Data had just
# placed the next read's FooterReader actor on ("Terminated by autoscaler"), and the job failed.
# Real clusters idle for minutes; the test only needs the release to happen while it waits.
IDLE_TIMEOUT_MIN = 0.5

AUTOSCALING = {
    "cluster_name": "raydistill-autoscaling-test",
    "max_workers": 2,
    "provider": {"type": "external",
                 "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                 "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def _generate_job(head, cfg_file: Path, *sets: str, timeout_s: float = 600) -> tuple[str, str]:
    """Submit ``python jobs/generate.py CONFIG --set ...`` to ``head``; returns (final status, log)."""
    from ray.job_submission import JobSubmissionClient


    # No working_dir: the fake nodes share the head's session folder, so a released node's agent
    # deletes the job's unpacked working_dir under the other nodes' workers ("FileNotFoundError"
    # from os.getcwd() in a new actor, seen here). Every fake node runs this machine's install of
    # raydistill; test_jobs covers working_dir on a real head.
    runtime_env = {"env_vars": job_runtime_env()["env_vars"]}
    runtime_env["env_vars"]["RAYDISTILL_AUTOSCALER_CONFIG"] = str(head.temp_dir / "autoscaling.yaml")
    client = JobSubmissionClient(head.dashboard)
    entry = shlex.join(["python", str(REPO / "jobs" / "generate.py"), str(cfg_file),
                        *[a for s in sets for a in ("--set", s)]])
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    status = wait_for_job(client, job_id, timeout_s)
    return str(status), client.get_job_logs(job_id)


@pytest.mark.slow  # 2.5-5 min, and on a loaded machine the fake nodes' timing varies (failed once in a full run)
def test_generation_scales_the_cluster_up_and_back_down(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", mixed_prompts(16))
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),  # one machine: every fake node sees this disk
        "storage": {"shared_local": True},
        "data": {"path": str(data), "prompt_field": "question", "id_field": "qid", "task_field": "kind",
                 "reference_field": "answer"},
        "teacher": {"model": str(tiny_model), "engine": "vllm", "replicas": 2, "cpus_per_replica": 1,
                    "batch_size": 2, "max_model_len": 160, "kv_cache_gib": 1},
        "generation": {"max_new_tokens": 8},
        "filter": {"empty": False, "no_final_answer": False},
    }))
    with ray_head(1, dashboard=True, autoscaling_config=AUTOSCALING) as head:
        # Too big even for the autoscaler: 6 replicas + tokenizer + Ray Data = 7.25 CPU; 1 + 2 × 2 = 5
        # at most. The job fails fast, and nothing is launched for it.
        status, log = _generate_job(head, cfg_file, "teacher.replicas=6", timeout_s=300)
        assert status == "FAILED", log[-3000:]
        log = " ".join(log.split())
        assert "= 7.25 CPU, but the cluster has 1 CPU (1 node) and can scale to 5 CPU (cpu_node: 2 CPU × up to 2 more" in log
        assert "answering up to" not in log  # refused before any generation
        assert len(head.nodes()) == 1  # and nothing was launched for it

        t0 = time.perf_counter()
        status, log = _generate_job(head, cfg_file)
        took = time.perf_counter() - t0
        assert status == "SUCCEEDED", log[-5000:]
        assert "the autoscaler will add" in log and "cpu_node" in log
        nodes = head.nodes()
        workers = [n for n in nodes if n["resources"].get("CPU") == 2.0]
        assert workers, nodes  # the autoscaler added cpu_node workers
        # ... and releases them once idle (idle_timeout_minutes + a few autoscaler rounds)
        deadline = time.time() + IDLE_TIMEOUT_MIN * 60 + 90
        while time.time() < deadline and any(n["alive"] for n in head.nodes() if n["resources"].get("CPU") == 2.0):
            time.sleep(3)
        alive = [n for n in head.nodes() if n["alive"]]
        assert [n["resources"].get("CPU") for n in alive] == [1.0], (alive, head.log.read_text()[-3000:])
    # every train/validation prompt answered, none failed
    manifest = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    cfg = load(cfg_file)
    prompts = load_prompts(cfg.data, cfg.task_prompts)
    expected = sum(1 for s in prompts.column("split").to_pylist() if s in ("train", "validation"))
    assert manifest["rows_generated"] == expected and manifest["rejects"].get("error", 0) == 0
    print(f"generation on the autoscaling cluster: {took:.0f} s, {len(workers)} worker node(s) added")
