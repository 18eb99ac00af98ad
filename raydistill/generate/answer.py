"""Answer a dataset of prompt rows with the configured engine (one stage, the same columns)."""

from __future__ import annotations

import logging
import math

import pyarrow as pa

from ..config import EngineConfig, GenerationConfig, StorageConfig
from ..schema import conform

log = logging.getLogger(__name__)

from .common import GENERATED_SCHEMA
from .hf_engine import HFGenerator
from .vllm_engine import vllm_dataset


def _cluster_has_gpus() -> bool:
    """True when the Ray cluster this process is connected to has GPUs (a CPU head node with GPU
    workers included), so a vLLM teacher runs on them without gpus_per_replica being set."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def answer_dataset(ds, model: str, engine: EngineConfig, gen: GenerationConfig, storage: StorageConfig | None = None):
    """Prompt rows -> the same rows with the engine's answers; lazy, one stage for every engine.

    Args:
        ds: ``ray.data.Dataset`` of rows with ``schema.PROMPTS_SCHEMA``.
        model: HF model folder (or hub id) with a chat template for ``vllm`` and ``hf``, or an
            ``s3://`` folder (a student written by train), which every engine replica fetches on
            its own node (vLLM: Ray LLM's downloader; hf and the prompt tokenizer:
            ``storage.local_copy``), so no node relies on the driver's disk; for ``openai`` the
            model name the endpoint serves (``teacher.model``).
        storage: the S3 settings for an ``s3://`` model (``cfg.storage``).
        engine: ``teacher`` or ``eval`` settings; ``engine.engine`` picks the engine.
    Returns:
        ``ray.data.Dataset`` whose batches have ``GENERATED_SCHEMA`` (prompt columns + generation
        columns). Nothing runs until it is consumed.
    """
    import ray

    from ..runtime import on_gpu_machine

    kind = engine.engine
    if kind == "openai":
        from .openai_engine import openai_dataset

        out = openai_dataset(ds, engine, gen)
    elif kind == "vllm":
        gpu = engine.asks_gpu() or _cluster_has_gpus() or on_gpu_machine()
        out = vllm_dataset(ds, model, engine, gen, gpu, storage)
    else:
        gpu = engine.gpus_per_replica > 0
        out = ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs=dict(model_dir=model, engine=engine.model_dump(include=set(EngineConfig.model_fields)),
                                       gen=gen.model_dump(), gpu=gpu, storage=storage.model_dump() if storage else None),
            batch_size=engine.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=engine.replicas),
            num_cpus=engine.cpus_per_replica, num_gpus=engine.gpus_per_replica,
        )
    return out.map_batches(lambda t: conform(t, GENERATED_SCHEMA), batch_format="pyarrow", batch_size=None)


def generate_dataset(prompts: pa.Table, model: str, engine: EngineConfig, gen: GenerationConfig,
                     storage: StorageConfig | None = None):
    """``answer_dataset`` over an in-memory table of prompt rows (evaluation's small prompt sets),
    cut into blocks of ``engine.batch_size`` so that every replica gets work."""
    import ray

    ds = ray.data.from_arrow(prompts)
    ds = ds.repartition(max(1, math.ceil(prompts.num_rows / engine.batch_size)))
    return answer_dataset(ds, model, engine, gen, storage)


def generate_table(prompts: pa.Table, model_dir: str, engine: EngineConfig, gen: GenerationConfig,
                   storage: StorageConfig | None = None) -> pa.Table:
    """``generate_dataset`` collected into one table, in the order of ``prompts``."""
    ds = generate_dataset(prompts, model_dir, engine, gen, storage)
    batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))  # conformed tables
    table = pa.concat_tables(batches) if batches else GENERATED_SCHEMA.empty_table()
    order = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    ids = table.column("prompt_id").to_pylist()
    if len(ids) != len(order) or set(ids) != set(order):
        missing = sorted(set(order) - set(ids))[:10]
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:10]
        raise RuntimeError(f"generation returned {len(ids)} rows for {len(order)} prompts "
                           f"(missing e.g. {missing}, duplicated e.g. {dupes})")
    idx = sorted(range(table.num_rows), key=lambda i: order[ids[i]])
    return table.take(idx)


