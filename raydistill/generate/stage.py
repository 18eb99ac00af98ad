"""The generate stage: prompts in, corpus out."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pyarrow as pa

from ..config import Config
from ..schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform

log = logging.getLogger(__name__)

from .answer import generate_table
from .common import _stop_ids


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

    from ..chat import tokenizer_fingerprint
    from ..corpus import write_prompts
    from ..data import load_prompts, resolve_data_path, select_split
    from ..layout import corpus_dir
    from ..models import resolve_model
    from ..runtime import init_ray, provenance

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
