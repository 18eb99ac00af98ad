"""How each model answers and is timed: the same engine load for every model, in rounds.

``timed_engines`` gives the engine each model answers with (every model at ``eval.batch_size`` and
``eval.replicas``, one batch in flight per replica), ``timing_settings`` states it for the report;
``split_rounds`` cuts the prompts into rounds of whole engine batches, ``answer_rounds`` has one
engine answer every round of one model, and ``served_timing`` times the same rounds on the running
``raydistill serve`` endpoint (``eval.latency_source: serve``). Computes no figure.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa

from ..config import Config, EngineConfig

log = logging.getLogger(__name__)


def split_rounds(prompts: pa.Table, rounds: int, batch_size: int | None = None) -> list[pa.Table]:
    """Cut ``prompts`` into timing rounds; every row lands in exactly one part, no part is empty.

    Without ``batch_size``: ``min(rounds, rows)`` parts, part r holds rows r, r + R, r + 2R, … (so
    each part mixes the task types). With ``batch_size`` (B): rounds of whole engine batches, so that
    one engine answering all rounds in a row never puts two rounds in one batch: ``R = min(rounds,
    ⌈rows / B⌉)`` parts, each a run of B × k rows of the interleaved order (rows 0, R, 2R, …, then 1,
    1 + R, …), k = ⌈rows / B⌉ / R (the first parts one batch more when it does not divide); the one
    short batch, if any, ends the last part."""
    rows = prompts.num_rows
    if batch_size is None:
        n = max(1, min(rounds, rows))
        return [prompts.take(list(range(r, rows, n))) for r in range(n)]
    batches = max(1, math.ceil(rows / batch_size))
    n = max(1, min(rounds, batches))
    order = [i for r in range(n) for i in range(r, rows, n)]
    per = [batches // n + (r < batches % n) for r in range(n)]
    parts, start = [], 0
    for r in range(n):
        end = rows if r == n - 1 else start + per[r] * batch_size
        parts.append(prompts.take(order[start:end]))
        start = end
    return parts


def answer_rounds(parts: list[pa.Table], model: str, engine: EngineConfig, gen, storage=None) -> pa.Table:
    """One model answers every round with one engine: the rounds' prompts go, round after round, as
    blocks of ``engine.batch_size`` rows (a block never holds two rounds; ``split_rounds`` with that
    batch size makes every round but the last whole batches) into one ``answer_dataset`` (one engine
    start, one actor pool) instead of one engine per round.

    Returns the answers (``GENERATED_SCHEMA`` + ``round``: int32, the part's index), in the order of
    the parts. Raises RuntimeError when a prompt is missing from the answers or answered twice."""
    import ray

    from ..generate import GENERATED_SCHEMA
    from ..generate.answer import answer_dataset

    size = engine.batch_size
    blocks = [part.slice(i, size) for part in parts for i in range(0, part.num_rows, size)]
    out = answer_dataset(ray.data.from_arrow(blocks), model, engine, gen, storage)
    batches = list(out.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(batches) if batches else GENERATED_SCHEMA.empty_table()
    where = {pid: (r, i) for r, part in enumerate(parts) for i, pid in enumerate(part.column("prompt_id").to_pylist())}
    ids = table.column("prompt_id").to_pylist()
    if len(ids) != len(where) or set(ids) != set(where):
        raise RuntimeError(f"{model}: the engine returned {len(ids)} answers for {len(where)} prompts (missing e.g. "
                           f"{sorted(set(where) - set(ids))[:10]}, duplicated e.g. "
                           f"{sorted({i for i in ids if ids.count(i) > 1})[:10]})")
    table = table.take(sorted(range(len(ids)), key=lambda k: where[ids[k]]))
    return table.append_column("round", pa.array([where[i][0] for i in table.column("prompt_id").to_pylist()],
                                                 pa.int32()))


def timed_engines(cfg: Config) -> dict[str, EngineConfig]:
    """The engine each model answers with in the timed rounds: one generation path for all three
    (``eval.engine``; an API teacher through ``openai``), and the same load for every model, so the
    ratios compare like with like: ``eval.batch_size`` prompts per batch, ``eval.replicas`` replicas,
    one batch in flight per replica (per-batch timings then add up to engine time). The teacher keeps
    what its model needs (tensor/pipeline parallelism, GPUs per replica, dtype, max length); the
    students use ``eval.*``. ``timing_settings`` states the result per model."""
    same = {"batch_size": cfg.eval.batch_size, "replicas": cfg.eval.replicas, "max_concurrent_batches": 1}
    engine = "openai" if cfg.teacher.engine == "openai" else cfg.eval.engine
    return {"teacher": cfg.teacher.model_copy(update={"engine": engine, **same}),
            "baseline_student": cfg.eval.model_copy(update=same), "student": cfg.eval.model_copy(update=same)}


def engine_gpus(engine: EngineConfig) -> float | None:
    """GPUs one engine holds: replicas × GPUs per replica (vLLM: at least tensor × pipeline parallel
    size); 0 on CPU; None for an API endpoint (unknown)."""
    if engine.engine == "openai":
        return None
    if engine_device(engine)[1] != "cuda":
        return 0
    per = engine.gpus_per_replica
    if engine.engine == "vllm":
        per = max(per, engine.tensor_parallel_size * getattr(engine, "pipeline_parallel_size", 1))
    return engine.replicas * per


def timing_settings(engines: dict[str, EngineConfig]) -> dict[str, dict]:
    """``report.json``'s ``timing.settings``: per model the engine, ``batch_size``, ``replicas``,
    ``concurrency`` (batches in flight at once: replicas × max_concurrent_batches) and ``gpus``
    (``engine_gpus``: the divisor of ``output_tokens_per_s_per_gpu``; 0 on CPU, null for an API)."""
    return {name: {"engine": e.engine, "batch_size": e.batch_size, "replicas": e.replicas,
                   "concurrency": e.replicas * e.max_concurrent_batches, "gpus": engine_gpus(e)}
            for name, e in engines.items()}


def engine_device(engine: EngineConfig) -> tuple[str, str]:
    """(dtype, device) the evaluation engine runs a model in (as ``generate`` decides)."""
    from ..runtime import on_gpu_machine

    gpu = engine.gpus_per_replica > 0 or (engine.engine == "vllm" and (engine.asks_gpu() or on_gpu_machine()))
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if gpu else "float32")
    return dtype, "cuda" if gpu else "cpu"


SERVED_MODELS = ("teacher", "student")


def served_timing(cfg: Config, parts: list[pa.Table], endpoint: str) -> dict[str, pa.Table]:
    """Send each round's prompts to the served teacher and student (``eval.latency_source: serve``).

    Round r sends ``parts[r]`` to both arms, one request at a time, the arm order alternating by
    round; one warm-up request per arm first (not kept). ``generation.*`` sampling. Returns model
    name → one row per request: ``prompt_id``, ``task``, ``round``, ``latency_s``, ``ttft_s``,
    ``response_tokens`` and ``prompt_tokens`` (the stream's usage), ``batch_id`` (one per request),
    ``answered_by``, ``error`` (null unless it failed)."""
    from ..serve.client import api_key, run_requests

    key = api_key(cfg)
    g = cfg.generation
    sampling = {"max_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed}

    def msgs(part: pa.Table) -> list[list[dict]]:
        return [[{"role": m["role"], "content": m["content"]} for m in row] for row in part.column("messages").to_pylist()]

    for name in SERVED_MODELS:
        run_requests(endpoint, name, msgs(parts[0])[:1], 1, sampling, key=key)
    rows: dict[str, list[dict]] = {n: [] for n in SERVED_MODELS}
    for r, part in enumerate(parts):
        for name in SERVED_MODELS if r % 2 == 0 else SERVED_MODELS[::-1]:
            log.info("evaluate: round %d/%d: served %s answers %d prompts at %s", r + 1, len(parts), name,
                     part.num_rows, endpoint)
            records, _ = run_requests(endpoint, name, msgs(part), 1, sampling, key=key)
            for rec, pid, task in zip(records, part.column("prompt_id").to_pylist(), part.column("task").to_pylist(),
                                      strict=True):
                rows[name].append({"prompt_id": pid, "task": task, "round": r, "latency_s": rec.latency_s,
                                   "ttft_s": rec.ttft_s, "response_tokens": rec.output_tokens,
                                   "prompt_tokens": rec.prompt_tokens, "batch_id": f"serve-{name}-{r}-{rec.index}",
                                   "answered_by": rec.answered_by, "error": rec.error})
    schema = pa.schema([("prompt_id", pa.string()), ("task", pa.string()), ("round", pa.int32()),
                        ("latency_s", pa.float64()), ("ttft_s", pa.float64()), ("response_tokens", pa.int32()),
                        ("prompt_tokens", pa.int32()), ("batch_id", pa.string()), ("answered_by", pa.string()),
                        ("error", pa.string())])
    return {n: pa.Table.from_pylist(rows[n], schema=schema) for n in SERVED_MODELS}
