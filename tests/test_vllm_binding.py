"""vLLM's CPU core binding is computed where the engine runs (its own process, on its node), not on
the driver and shipped to engines on other nodes."""

from __future__ import annotations

import importlib
import os

import pytest

from raydistill.config import EngineConfig, GenerationConfig, ServeArmConfig
from raydistill.runtime import BIND_KEY, bind_vllm_threads, cpu_binding, vllm_env, vllm_runtime_env

HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def test_cpu_binding_lists_the_cpus_as_ranges():
    assert cpu_binding(range(8)) == "0-7"
    assert cpu_binding(range(96)) == "0-95"
    assert cpu_binding([0, 1, 4, 5, 6]) == "0-1,4-6"  # a cpuset with holes (a container's share)
    assert cpu_binding({9, 3, 2, 8}) == "2-3,8-9"
    assert cpu_binding([5]) == "5"
    with pytest.raises(ValueError, match="no CPUs"):
        cpu_binding([])


def test_the_hook_binds_the_cpus_of_the_process_it_runs_in(monkeypatch):
    """What an engine actor on a 16-core node whose container may use cores 0-11 sets."""
    monkeypatch.setenv(BIND_KEY, "")  # so that monkeypatch puts the original state back afterwards
    monkeypatch.delenv(BIND_KEY)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    bind_vllm_threads()
    assert os.environ[BIND_KEY] == "0-11"
    monkeypatch.setenv(BIND_KEY, "0-3")  # a user's own binding on that node wins
    bind_vllm_threads()
    assert os.environ[BIND_KEY] == "0-3"


def _hook(env_vars: dict) -> object:
    module, _, name = env_vars[HOOK_ENV].rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_engines_get_the_hook_not_the_drivers_binding(monkeypatch):
    """The runtime_env of the batch engine (ray.data.llm) and of a CPU Serve replica: no core
    binding from this machine, and the setup hook that computes it on the engine's node."""
    from raydistill.generate.vllm_engine import _vllm_config
    from raydistill.serve.app import llm_config

    monkeypatch.delenv(BIND_KEY, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # the driver's cores
    processor = _vllm_config("/models/teacher", EngineConfig(engine="vllm", kv_cache_gib=3), GenerationConfig(),
                             gpu=False)
    serve = llm_config("student", "/models/student", ServeArmConfig(kv_cache_gib=2))
    for env, kv in ((processor.runtime_env["env_vars"], "3"), (serve["runtime_env"]["env_vars"], "2")):
        assert BIND_KEY not in env, env
        assert _hook(env) is bind_vllm_threads
        assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == kv
    # an engine this process starts on this machine binds this machine's cores
    assert vllm_env(1, here=True)[BIND_KEY] == "0-1"
    # a user's binding set on the driver is passed on as it is
    monkeypatch.setenv(BIND_KEY, "0-5")
    assert vllm_runtime_env(1)["env_vars"][BIND_KEY] == "0-5"


def test_a_ray_worker_computes_the_binding_in_its_own_process(ray_local):
    """The real thing: an actor started with the engines' runtime_env runs the hook at start-up,
    in its own process, before any method runs."""
    import ray

    @ray.remote(num_cpus=0.01)
    class Probe:
        def env(self):
            return os.environ.get(BIND_KEY), sorted(os.sched_getaffinity(0))

    env = vllm_runtime_env(1)["env_vars"]
    env.pop(BIND_KEY, None)  # a local Ray's workers inherit this process's environment
    probe = Probe.options(runtime_env={"env_vars": env}).remote()
    bind, cpus = ray.get(probe.env.remote(), timeout=120)
    assert bind == cpu_binding(cpus), (bind, cpus)
