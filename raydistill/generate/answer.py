"""Answer a dataset of prompt rows with the configured engine (one stage, the same columns)."""

from __future__ import annotations

import logging
import math

import pyarrow as pa

from ..config import EngineConfig, GenerationConfig
from ..schema import conform

log = logging.getLogger(__name__)

from .common import GENERATED_SCHEMA
from .hf_engine import HFGenerator
from .vllm_engine import _vllm_dataset


def generate_dataset(prompts: pa.Table, model_dir: str, engine: EngineConfig, gen: GenerationConfig):
    """A lazy Ray Dataset of ``prompts`` answered by the model in ``model_dir``.

    Args:
        prompts: rows with ``schema.PROMPTS_SCHEMA``.
        model_dir: local HF model folder (or hub id) with a chat template.
    Returns:
        ``ray.data.Dataset`` whose batches have ``GENERATED_SCHEMA`` (prompt columns + generation
        columns). Nothing runs until it is consumed.
    """
    import ray

    from ..runtime import on_gpu_machine

    gpu = engine.gpus_per_replica > 0 or (engine.engine == "vllm" and on_gpu_machine())
    ds = ray.data.from_arrow(prompts)
    # Small prompt sets would otherwise land in one block and use one replica.
    ds = ds.repartition(max(1, math.ceil(prompts.num_rows / engine.batch_size)))
    if engine.engine == "vllm":
        out = _vllm_dataset(ds, model_dir, engine, gen, gpu)
    else:
        out = ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs=dict(model_dir=model_dir, engine=engine.model_dump(include=set(EngineConfig.model_fields)),
                                       gen=gen.model_dump(), gpu=gpu),
            batch_size=engine.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=engine.replicas),
            num_cpus=engine.cpus_per_replica, num_gpus=engine.gpus_per_replica,
        )
    return out.map_batches(lambda t: conform(t, GENERATED_SCHEMA), batch_format="pyarrow",
                           batch_size=None)


def generate_table(prompts: pa.Table, model_dir: str, engine: EngineConfig, gen: GenerationConfig) -> pa.Table:
    """``generate_dataset`` collected into one table, in the order of ``prompts``."""
    ds = generate_dataset(prompts, model_dir, engine, gen)
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


