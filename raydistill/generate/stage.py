"""The generate stage: prompt files in, ``corpus/`` out, as one streaming Ray Data job.

Rows flow from storage to storage (local or ``s3://``); the driver plans, watches and writes the
manifest, and holds no rows (only small aggregates: counts per split, task or reason, and the ids
of exact duplicates). Steps, each resumable:

1. **Prompts** (``prompts``). Ray Data reads ``data.path`` (a file, a folder of shards or a glob;
   jsonl, json, parquet or csv), turns each batch of records into prompt rows
   (``data.make_prompts``: messages with the task's system prompt, the stable split) and writes
   ``corpus/prompts/`` — every prompt of the run, test included. ``data.limit`` keeps a seeded
   sample spread over the task types (the ``data.sample_by_task`` rule, computed with per-task
   thresholds in Ray Data). Before the job, the first file's first rows get the line-exact checks of
   ``raydistill validate``.
2. **Answers** (``answering``). The train and validation prompts go through the teacher engine
   (``answer.answer_dataset``) in blocks of one engine batch and are written to
   ``corpus/generated/`` in files of ``generation.rows_per_file`` answers. Ray Data's row-level
   checkpointing (``ray.data.checkpoint.CheckpointConfig``, keyed by ``prompt_id``, two-phase commit
   per shard) records what was written, so a rerun after a crash or a kill answers only the prompts
   not yet written: every prompt id ends up exactly once.
3. **Errors** (``answering``). A row the engine failed on is never committed as done: it goes to
   ``corpus/errors/`` (this run's failures, outside the checkpoint), so the next run answers it
   again. When more than ``generation.max_error_rate`` of the last ``generation.error_window``
   requests failed (an API outage, a dead engine), the run stops early, keeping every answer
   written, with the rate and what was kept. At the end of a run, when more than
   ``generation.max_error_share`` of the prompts failed, the job stops (the message gives the share
   and the first errors); below it the failed rows become rejects with reason ``error``.
4. **Filter** (``filtering``). Each answer is kept (``corpus/data/``) or rejected with its reason
   (``corpus/rejects/``, see ``generate.filters``).
5. **Manifest** (this module), written last: what the corpus holds and how it was made, rows added
   by each run.

This module runs the steps in order and writes the manifest; ``resume`` holds what lets a rerun
continue (the settings a corpus keeps, the runs, the checkpoint bookkeeping) and ``GenerationError``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone

from ..config import Config
from ..corpus import COMPLETE, DATA_DIR, MANIFEST, PROMPTS_DIR, REJECTS_DIR, read_manifest
from ..schema import SCHEMA_VERSION
from .answering import generate_answers
from .filtering import check_errors, check_kept, filter_config, outcome_stats, tag_answers, write_filtered
from .prompts import precheck_sample, write_prompts
from .resume import (
    ERRORS_DIR,
    RUNS_DIR,
    SETTINGS,
    GenerationError,
    check_settings,
    cleanup,
    committed_rows,
    run_history,
    settle_checkpoints,
    shared_settings,
)

log = logging.getLogger(__name__)


def run_generate(cfg: Config, overwrite: bool = False) -> dict:
    """Answer the train and validation prompts with the teacher and write ``corpus/`` (see the
    module docstring for the steps and ``raydistill.corpus`` for the layout).

    A rerun continues an unfinished corpus (same settings required, else GenerationError) and
    returns a finished one unchanged; ``overwrite`` deletes the corpus first.

    Returns the manifest: ``rows`` (kept), ``rows_generated``, ``rejects`` (reason → rows),
    ``finish_reasons``, ``splits`` (kept rows per split), ``prompts_by_split``, ``prompts``
    (answered), ``prompt_tokens`` / ``response_tokens`` (all answers), ``seconds`` (generation wall time,
    engine start-up included, summed over the runs that finished that step; a killed run did
    not), ``tokens_per_s`` (response tokens / seconds,
    null unless this run generated every row), ``cost_usd`` (with ``teacher.price_per_mtok``),
    ``runs`` (each run's start and ``rows_added``), ``teacher``, ``teacher_tokenizer``,
    ``stop_token_ids``, ``engine``, ``generation_params``, ``data``, ``shards`` /
    ``reject_shards`` (relative paths), ``provenance``.

    Raises DataError (bad prompt files), GenerationError (too many failed answers, changed
    settings, duplicate ids), ModelError (teacher not found).
    """
    from ..chat import tokenizer_fingerprint
    from ..layout import corpus_location
    from ..runtime import init_ray, provenance
    from .common import model_stop_ids
    from .filters import REASONS

    out = corpus_location(cfg)
    if overwrite and out.exists():
        log.info("generate: --overwrite: deleting %s", out)
        out.delete()
    if cfg.teacher.engine == "openai":
        from .openai_engine import api_key

        api_key(cfg.teacher)  # a missing key fails now, before any prompt is read
        from .openai_engine import exact_ids_problem

        if problem := exact_ids_problem(cfg):  # logit KD only with exact token ids
            raise GenerationError(problem)
        teacher_model = cfg.teacher.model
        tokenizer_ref = cfg.teacher.tokenizer
        stop_ids: list[int] = []
    else:
        from ..models import resolve_model

        teacher_model = tokenizer_ref = resolve_model(cfg.teacher.model)
        stop_ids = sorted(model_stop_ids(teacher_model, cfg.storage))  # metadata files only
    teacher_tokenizer = None
    teacher_vocab_size = None
    if tokenizer_ref:
        from transformers import AutoTokenizer

        from ..models import model_metadata

        tok = AutoTokenizer.from_pretrained(model_metadata(tokenizer_ref, cfg.storage))  # no weights fetched
        teacher_tokenizer, teacher_vocab_size = tokenizer_fingerprint(tok), len(tok)
    settings = shared_settings(cfg, teacher_tokenizer)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        check_settings(out, settings, finished=True)
        cleanup(out)
        log.info("generate: %s is complete (%d rows kept of %d); nothing to do (--overwrite starts again)",
                 out, manifest["rows"], manifest["rows_generated"])
        return manifest
    if not (out / PROMPTS_DIR / COMPLETE).is_file():
        precheck_sample(cfg)  # line-exact errors before any job (and before anything is written)
    check_settings(out, settings)
    init_ray()
    settle_checkpoints(out)
    (out / ERRORS_DIR).delete()  # an earlier run's failures: not committed, answered again now
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    rows_before = committed_rows(out)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_file = out / RUNS_DIR / f"{run_id}.json"
    run_file.write_text(json.dumps({"run": run_id, "started": started, "rows_before": rows_before}))
    if rows_before:
        log.info("generate: continuing %s: %d answers already written are kept", out, rows_before)

    prompts_info = write_prompts(cfg, out)
    by_split = prompts_info["by_split"]
    to_answer = by_split["train"] + by_split["validation"]
    if to_answer == 0:
        raise GenerationError("no prompts in the train/validation splits; lower data.split.test or add data")
    t0 = time.perf_counter()
    if rows_before < to_answer:  # else every answer is written: no engine to start
        generate_answers(cfg, out, teacher_model, to_answer - rows_before)
    seconds = time.perf_counter() - t0
    run_file.write_text(json.dumps({"run": run_id, "started": started, "rows_before": rows_before,
                                    "seconds": round(seconds, 2)}))

    tagged = tag_answers(cfg, out)
    stats = outcome_stats(tagged)
    rows_generated = sum(r["count()"] for r in stats)
    if rows_generated != to_answer:
        raise GenerationError(f"corpus/generated/ holds {rows_generated} answers for {to_answer} prompts; rerun to "
                              "continue, or --overwrite to start again")
    check_errors(tagged, stats, cfg.generation.max_error_share)
    check_kept(stats, filter_config(cfg))
    write_filtered(tagged, out)
    kept: dict[str, int] = {}
    rejects: dict[str, int] = {}
    for r in stats:
        if r["outcome"] == "kept":
            kept[r["split"]] = kept.get(r["split"], 0) + r["count()"]
        else:
            rejects[r["outcome"]] = rejects.get(r["outcome"], 0) + r["count()"]
    finish = {r: sum(s["count()"] for s in stats if s["finish_reason"] == r) for r in ("stop", "length", "error")}
    prompt_tokens = sum(int(s["sum(prompt_tokens)"] or 0) for s in stats)
    response_tokens = sum(int(s["sum(response_tokens)"] or 0) for s in stats)
    runs = run_history(out, rows_generated)
    this_run_all = rows_before == 0
    price = cfg.teacher.price_per_mtok
    data_settings = cfg.data.model_dump(mode="json")
    data_settings["inputs"] = prompts_info.get("inputs")  # the files read (count, format, first and last)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "rows": sum(kept.values()),
        "rows_generated": rows_generated,
        "rows_with_error": finish["error"],
        "rejects": {r: rejects.get(r, 0) for r in REASONS},
        "finish_reasons": finish,
        "splits": {s: kept.get(s, 0) for s in ("train", "validation")},
        "prompts_by_split": by_split,
        "prompts": to_answer,
        "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens,
        # generation wall time over the runs that recorded it (a killed run did not), engine start-up included
        "seconds": round(sum(r.get("seconds") or 0 for r in runs), 2),
        "tokens_per_s": round(response_tokens / seconds, 2) if this_run_all and seconds > 0 else None,
        "cost_usd": (round(prompt_tokens / 1e6 * price.input + response_tokens / 1e6 * price.output, 4)
                     if price else None),
        "runs": runs,
        "teacher": cfg.teacher.model,
        "teacher_tokenizer": teacher_tokenizer,
        "teacher_vocab_size": teacher_vocab_size,  # tokens of the teacher's tokenizer (logit KD checks)
        "stop_token_ids": stop_ids,
        "engine": cfg.teacher.engine,
        "generation_params": cfg.generation.model_dump(),
        "data": data_settings,
        "task_prompts": cfg.task_prompts.model_dump(mode="json"),
        "filter": cfg.filter.model_dump(),
        "shards": [f"{DATA_DIR}/{f.name}" for f in (out / DATA_DIR).files(".parquet")],
        "reject_shards": [f"{REJECTS_DIR}/{f.name}" for f in (out / REJECTS_DIR).files(".parquet")],
        "provenance": provenance(),
    }
    (out / "config.yaml").write_text(cfg.dump())
    recorded = json.loads((out / SETTINGS).read_text())
    (out / SETTINGS).write_text(json.dumps(dict(recorded, filter=cfg.filter.model_dump()), indent=2, sort_keys=True))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the corpus complete
    cleanup(out)
    log.info("generate: %d answers (%s); kept %d, rejected %d (%s); %d response tokens; this run added %d rows "
             "in %.1f s -> %s", rows_generated, ", ".join(f"{k} {v}" for k, v in finish.items()), manifest["rows"],
             sum(rejects.values()), ", ".join(f"{k} {v}" for k, v in rejects.items() if v) or "none",
             response_tokens, runs[-1]["rows_added"] if runs else rows_generated, seconds, out)
    return manifest
