"""What every engine shares: the output columns, how an answer ended, stop ids, throughput."""

from __future__ import annotations

import logging

import pyarrow as pa

from ..config import EngineConfig
from ..schema import GENERATION_FIELDS, PROMPTS_SCHEMA

log = logging.getLogger(__name__)

GENERATED_SCHEMA = pa.schema(list(PROMPTS_SCHEMA) + GENERATION_FIELDS)


#: Logical CPUs of one prompt-tokenizer actor (chat template + tokenizer, no model).
TOKENIZER_CPUS = 0.25


def prompt_tokenizer_pool(engine: EngineConfig) -> dict:
    """``map_batches`` arguments of the prompt tokenizer in front of the engine replicas: an
    autoscaling actor pool of 1 to ``engine.replicas`` actors of ``TOKENIZER_CPUS`` each (Ray LLM
    sizes its own tokenize stage from the processor's concurrency the same way), so 8 teacher
    replicas are fed by up to 8 tokenizers, not one. Returns ``compute`` and ``num_cpus``."""
    import ray

    return dict(compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, engine.replicas)),
                num_cpus=TOKENIZER_CPUS)


def engine_dtype(engine: EngineConfig, gpu: bool) -> str:
    if engine.dtype != "auto":
        return engine.dtype
    return "bfloat16" if gpu else "float32"


def chat_messages(value) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def flat_top_logprobs(entries, k: int) -> tuple[list[list[int]] | None, list[list[float]] | None]:
    """Flatten vLLM's per-token ``{token_id: {"logprob": ...}}`` dicts into (len, k) lists."""
    if not k or entries is None:
        return None, None
    ids, lps = [], []
    for entry in entries:
        items = sorted(((int(t), float(v["logprob"])) for t, v in dict(entry).items()),
                       key=lambda x: -x[1])[:k]
        ids.append([t for t, _ in items])
        lps.append([lp for _, lp in items])
    return ids, lps


def model_stop_ids(model_dir: str, storage=None) -> set[int]:
    """Token ids that end an answer for the model ``model_dir`` (any model reference;
    ``chat.stop_token_ids``: the EOS ids of generation_config.json / config.json and the
    tokenizer's EOS, the ids vLLM and transformers stop on). Only the model's metadata files are
    read (``models.model_metadata``: a hub id or ``s3://`` model fetches no weights)."""
    from ..chat import stop_token_ids
    from ..models import model_metadata

    ids = stop_token_ids(model_metadata(model_dir, storage))
    if not ids:
        log.warning("%s declares no EOS token id: every answer will end by length", model_dir)
    return ids


def finish_reason_of(tokens: list[int], stop_ids: set[int]) -> str:
    """How an answer ended, read from its tokens with the engine's own rule: "stop" when its last
    token is one of the model's stop ids (the engine ends an answer there and keeps that token),
    else "length" (``max_new_tokens`` reached, or the prompt + answer filled ``max_model_len``)."""
    return "stop" if tokens and tokens[-1] in stop_ids else "length"



def engine_throughput(table: pa.Table) -> float:
    """Generated tokens per second of engine time (tokens/s), engine start-up excluded.

    Engine time = the sum over engine batches (``batch_id``) of the slowest answer's
    ``latency_s``: exact when batches run one after another (evaluation sets
    ``max_concurrent_batches=1``); batches of parallel replicas are summed, so this is per replica.
    """
    spans: dict[str, float] = {}
    tokens = 0
    for bid, lat, n in zip(table.column("batch_id").to_pylist(), table.column("latency_s").to_pylist(),
                           table.column("response_tokens").to_pylist()):
        if lat is not None:
            spans[bid] = max(spans.get(bid, 0.0), lat)
            tokens += n or 0
    seconds = sum(spans.values())
    return tokens / seconds if seconds > 0 else 0.0


