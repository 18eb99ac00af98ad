"""The generate stage: prompt files in, ``corpus/`` out, as one streaming Ray Data job.

Rows flow from storage to storage (local or ``s3://``); the driver plans, watches and writes the
manifest, and holds no rows (only small aggregates: counts per split, task or reason, and the ids
of exact duplicates). Steps, each resumable:

1. **Prompts.** Ray Data reads ``data.path`` (a file, a folder of shards or a glob; jsonl, json,
   parquet or csv), turns each batch of records into prompt rows (``data.make_prompts``: messages
   with the task's system prompt, the stable split) and writes ``corpus/prompts/`` — every prompt
   of the run, test included. ``data.limit`` keeps a seeded sample spread over the task types
   (the ``data.sample_by_task`` rule, computed with per-task thresholds in Ray Data). Before the
   job, the first file's first rows get the line-exact checks of ``raydistill validate``.
2. **Answers.** The train and validation prompts go through the teacher engine
   (``answer.answer_dataset``) and are written shard by shard to ``corpus/generated/``. Ray Data's
   row-level checkpointing (``ray.data.checkpoint.CheckpointConfig``, keyed by ``prompt_id``,
   two-phase commit per shard) records what was written, so a rerun after a crash or a kill
   answers only the prompts not yet written: every prompt id ends up exactly once.
3. **Errors.** A row the engine failed on is kept with its error; the job stops when more than
   ``generation.max_error_share`` of the rows failed (the message gives the share and the first errors).
4. **Filter.** Each answer is kept (``corpus/data/``) or rejected with its reason
   (``corpus/rejects/``, see ``generate.filters``).
5. **Manifest**, written last: what the corpus holds and how it was made, rows added by each run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from functools import partial

import pyarrow as pa

from ..config import DataConfig, TaskPromptsConfig
from ..config import Config
from ..corpus import (COMPLETE, DATA_DIR, GENERATED_DIR, MANIFEST, PROMPTS_DIR, REJECTS_DIR, REJECTS_SCHEMA,
                      read_manifest)
from ..schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform
from ..storage import StoragePath

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "_checkpoint"
RUNS_DIR = "_runs"
SETTINGS = "_settings.json"
PRECHECK_ROWS = 1000  # rows of the first file checked line by line before the job
PRECHECK_MAX_BYTES = 64 * 2**20  # a first file larger than this is not read on the driver


class GenerationError(ValueError):
    """Generation cannot go on: too many failed rows, settings changed under a resumed corpus,
    duplicate prompt ids. Rows already written are kept."""


# ----------------------------------------------------------------------------- prompt files

def prompt_files(cfg: Config) -> tuple[list[StoragePath], str]:
    """The prompt files behind ``data.path`` and their format (suffix).

    ``data.path`` is a file, a folder (every file with a prompt-file suffix under it) or a glob
    in its last component (``s3://bucket/prompts/part-*.jsonl``); local or ``s3://``.
    Raises DataError when nothing matches or the files mix formats.
    """
    import os
    from pathlib import Path

    from ..config import DEMO_DATA
    from ..data import FORMATS, DataError
    from ..storage import storage_path

    if cfg.data.path == DEMO_DATA:
        path = str(Path(__file__).resolve().parent.parent / "demo" / "prompts.jsonl")
    else:
        path = cfg.data.path
    loc = storage_path(path, cfg.storage)
    if loc.is_file():
        files = [loc]
    elif loc.is_dir():
        files = [f for f in loc.files() if f.name.lower().endswith(FORMATS)]
        if not files:
            raise DataError(f"data.path {cfg.data.path}: the folder holds no prompt files ({', '.join(FORMATS)})")
    elif any(c in loc.name for c in "*?["):
        files = loc.glob()
        if not files:
            raise DataError(f"data.path {cfg.data.path}: no file matches the pattern")
    else:
        where = "" if loc.remote or os.path.isabs(cfg.data.path) else f" (resolved against the current directory {os.getcwd()}: {loc.uri})"
        raise DataError(f"data file not found: {cfg.data.path}{where}")
    suffixes = sorted({"." + f.name.rsplit(".", 1)[-1].lower() for f in files})
    if len(suffixes) > 1:
        raise DataError(f"data.path {cfg.data.path} mixes formats {suffixes}; give one format per run")
    if suffixes[0] not in FORMATS:
        raise DataError(f"{files[0]}: unsupported format {suffixes[0]!r}; use one of {', '.join(FORMATS)}")
    return files, suffixes[0]


def precheck_sample(cfg: Config) -> pa.Table:
    """The first ``PRECHECK_ROWS`` rows of the first prompt file as prompt rows, with the
    line-exact checks of ``data.read_records`` + ``data.make_prompts``; a first file larger than
    ``PRECHECK_MAX_BYTES`` is not read (empty table). Raises DataError naming the file, line and field."""
    import tempfile
    from pathlib import Path

    from ..data import DataError, make_prompts, read_records
    from ..schema import PROMPTS_SCHEMA

    files, _ = prompt_files(cfg)
    first = files[0]
    size = first.fs.get_file_info(first.path).size or 0
    if size > PRECHECK_MAX_BYTES:
        log.info("generate: %s is %.0f MB; its rows are checked as they stream", first, size / 2**20)
        return PROMPTS_SCHEMA.empty_table()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(first.path)
        if first.remote:
            local = Path(tmp) / first.name
            local.write_bytes(first.read_bytes())
        try:
            records = read_records(local)[:PRECHECK_ROWS]
        except DataError as e:  # name the file as the user gave it (s3://...), not the temporary copy
            raise DataError(str(e).replace(str(local), first.uri)) from None
    return make_prompts(records, cfg.data, cfg.task_prompts, first.uri)


def _read_records(files: list[StoragePath], suffix: str):
    import ray

    uris = [f.uri for f in files]
    fs = files[0].fs
    if suffix == ".parquet":
        return ray.data.read_parquet(uris, filesystem=fs)
    if suffix == ".csv":
        # Every cell as text, as the csv module reads it ("007" stays "007"; no type guessing).
        import csv
        import io

        import pyarrow.csv as pcsv

        with fs.open_input_stream(files[0].path) as f:
            head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
        header = next(csv.reader(io.StringIO(head)), [])
        return ray.data.read_csv(uris, filesystem=fs, convert_options=pcsv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=False))
    return ray.data.read_json(uris, filesystem=fs)  # newline-delimited JSON, or a JSON list per file


def _sample_rank(pid: str, seed: int) -> int:
    """The rank ``data.sample_by_task`` orders a task's prompts by (first 8 bytes of the same hash)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:sample:{pid}".encode()).digest()[:8], "big")


def _prompt_batch(batch: pa.Table, data: dict, task_prompts: dict, source: str, rank_seed: int | None) -> pa.Table:
    from ..data import make_prompts

    table = make_prompts(batch.to_pylist(), DataConfig.model_validate(data),
                         TaskPromptsConfig.model_validate(task_prompts), source)
    if rank_seed is not None:
        ranks = [_sample_rank(p, rank_seed) for p in table.column("prompt_id").to_pylist()]
        table = table.append_column("_rank", pa.array(ranks, pa.uint64()))
    return table


def _threshold(group: pa.Table, quotas: dict[str, int]) -> pa.Table:
    import numpy as np

    task = group.column("task")[0].as_py()
    ranks = np.sort(group.column("_rank").to_numpy())
    keep = min(quotas.get(task, 0), len(ranks))
    return pa.table({"task": [task], "threshold": pa.array([int(ranks[keep - 1]) if keep else -1], pa.int64()),
                     "keep": [keep]})


def _below(batch: pa.Table, thresholds: dict[str, int]) -> pa.Table:
    ranks = batch.column("_rank").to_pylist()
    tasks = batch.column("task").to_pylist()
    mask = [t in thresholds and thresholds[t] >= 0 and r <= thresholds[t] for t, r in zip(tasks, ranks)]
    return batch.filter(pa.array(mask, pa.bool_())).drop_columns(["_rank"])


def _write_prompts(cfg: Config, out: StoragePath) -> dict:
    """Step 1: ``corpus/prompts/`` (every prompt with its split); returns its ``_COMPLETE`` record."""
    import ray

    from ..data import DataError

    folder = out / PROMPTS_DIR
    if (folder / COMPLETE).is_file():
        info = json.loads((folder / COMPLETE).read_text())
        log.info("generate: prompts/ already written (%d prompts); reusing its split", info["rows"])
        return info
    folder.delete()
    files, suffix = prompt_files(cfg)
    log.info("generate: reading %d prompt file(s) (%s) from %s", len(files), suffix, cfg.data.path)
    limit = cfg.data.limit
    ds = _read_records(files, suffix).map_batches(
        _prompt_batch, batch_format="pyarrow", batch_size=1024,
        fn_kwargs=dict(data=cfg.data.model_dump(), task_prompts=cfg.task_prompts.model_dump(),
                       source=cfg.data.path, rank_seed=cfg.data.seed if limit else None))
    if limit:
        from ..data import task_quotas

        counts = {r["task"]: int(r["count()"]) for r in ds.groupby("task", num_partitions=1).count().take_all()}
        quotas = task_quotas(counts, limit)
        rows = (ds.select_columns(["task", "_rank"]).groupby("task", num_partitions=1)
                .map_groups(partial(_threshold, quotas=quotas), batch_format="pyarrow").take_all())
        thresholds = {r["task"]: int(r["threshold"]) for r in rows}
        log.info("generate: data.limit=%d keeps %s of %d prompts", limit,
                 ", ".join(f"{t} {q}/{counts[t]}" for t, q in sorted(quotas.items())), sum(counts.values()))
        ds = ds.map_batches(_below, batch_format="pyarrow", fn_kwargs=dict(thresholds=thresholds))
    ds.write_parquet(folder.uri, filesystem=folder.fs)
    written = ray.data.read_parquet(folder.uri, filesystem=folder.fs)
    dupes = written.groupby("prompt_id").count().filter(lambda r: r["count()"] > 1).take(10)
    if dupes:
        folder.delete()
        raise DataError(f"{cfg.data.path}: duplicate prompt id(s) {[d['prompt_id'] for d in dupes]}; prompt ids must "
                        "be unique (without data.id_field they are hashed from the prompt text, so the text repeats)")
    by_split = {r["split"]: int(r["count()"]) for r in written.groupby("split", num_partitions=1).count().take_all()}
    if not by_split:
        raise DataError(f"{cfg.data.path}: the dataset is empty (no rows)")
    info = {"rows": sum(by_split.values()), "by_split": {s: by_split.get(s, 0) for s in ("train", "validation", "test")}}
    (folder / COMPLETE).write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- answers

def _corpus_batch(batch: pa.Table, teacher: str, params: str) -> pa.Table:
    n = batch.num_rows
    batch = batch.append_column("teacher", pa.array([teacher] * n, pa.string()))
    batch = batch.append_column("generation_params", pa.array([params] * n, pa.string()))
    return conform(batch, CORPUS_SCHEMA)


def _not_test(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.not_equal(batch.column("split"), "test"))


def _generate(cfg: Config, out: StoragePath, teacher_model: str, to_answer: int) -> None:
    """Step 2: answer the train/validation prompts not yet written into ``corpus/generated/``."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from .answer import answer_dataset

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="prompt_id", checkpoint_path=(out / CHECKPOINT_DIR).uri, override_filesystem=out.fs,
        delete_checkpoint_on_success=False)  # the manifest step removes it, after the filter pass
    try:
        prompts = out / PROMPTS_DIR
        ds = ray.data.read_parquet(prompts.uri, filesystem=prompts.fs)
        # Blocks of one engine batch: every replica gets work, and a kill loses at most the
        # batches in flight (each written shard is committed on its own).
        ds = ds.map_batches(_not_test, batch_format="pyarrow", batch_size=None)
        ds = ds.repartition(target_num_rows_per_block=cfg.teacher.batch_size)
        answered = answer_dataset(ds, teacher_model, cfg.teacher, cfg.generation)
        params = json.dumps(cfg.generation.model_dump(), sort_keys=True)
        answered = answered.map_batches(_corpus_batch, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs=dict(teacher=cfg.teacher.model, params=params))
        gen = out / GENERATED_DIR
        log.info("generate: answering up to %d prompts with %s (engine %s) -> %s", to_answer, cfg.teacher.model,
                 cfg.teacher.engine, gen)
        answered.write_parquet(gen.uri, filesystem=gen.fs)
    finally:
        ctx.checkpoint_config = None


def _committed_rows(out: StoragePath) -> int:
    """Rows whose shard is committed (Ray Data's checkpoint files, pending ones left out)."""
    import pyarrow.parquet as pq

    total = 0
    for f in (out / CHECKPOINT_DIR).files(".parquet"):
        if not f.name.endswith(".pending.parquet"):
            total += pq.ParquetFile(f.fs.open_input_file(f.path)).metadata.num_rows
    return total


# ----------------------------------------------------------------------------- stats and manifest

def _stats(tagged) -> list[dict]:
    """Rows and token sums per (split, finish_reason, reject reason or "kept"): a few rows, whatever
    the corpus size (one small groupby in Ray Data)."""
    from ray.data.aggregate import Count, Sum

    def outcome(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.select(["split", "finish_reason", "prompt_tokens", "response_tokens"]).append_column(
            "outcome", pc.fill_null(batch.column("reject_reason"), "kept"))

    return (tagged.map_batches(outcome, batch_format="pyarrow", batch_size=None)
            .groupby(["split", "finish_reason", "outcome"], num_partitions=1)
            .aggregate(Count(), Sum("prompt_tokens"), Sum("response_tokens")).take_all())


def _check_errors(gen, stats: list[dict], max_share: float) -> None:
    total = sum(r["count()"] for r in stats)
    failed = sum(r["count()"] for r in stats if r["finish_reason"] == "error")
    if total and failed / total > max_share:
        first = (gen.filter(lambda r: r["finish_reason"] == "error").select_columns(["prompt_id", "error"]).take(5))
        examples = "; ".join(f"{r['prompt_id']}: {str(r['error'])[:200]}" for r in first)
        raise GenerationError(
            f"{failed} of {total} answers failed ({failed / total:.1%}), more than generation.max_error_share="
            f"{max_share:.0%}; first errors: {examples}. The rows written are kept in corpus/generated/; fix the "
            "cause (e.g. teacher.max_model_len) and rerun with --overwrite, or raise generation.max_error_share")
    if failed:
        log.warning("generate: %d of %d answers failed (%.1f%%; generation.max_error_share=%.0f%%); they go to "
                    "corpus/rejects/ with reason 'error'", failed, total, 100 * failed / total, 100 * max_share)


def _tag(batch: pa.Table, cfg_json: str, duplicates: frozenset[str]) -> pa.Table:
    from ..config import Config as _Config
    from .filters import reject_reasons

    cfg = _Config.model_validate_json(cfg_json)
    reasons = reject_reasons(batch, cfg).to_pylist()
    ids = batch.column("prompt_id").to_pylist()
    reasons = [r if r is not None or pid not in duplicates else "duplicate" for r, pid in zip(reasons, ids)]
    return batch.append_column("reject_reason", pa.array(reasons, pa.string()))


def _kept(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return conform(batch.filter(pc.is_null(batch.column("reject_reason"))), CORPUS_SCHEMA)


def _rejected(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return conform(batch.filter(pc.is_valid(batch.column("reject_reason"))), REJECTS_SCHEMA)


def _tagged(cfg: Config, out: StoragePath):
    """Every answer in ``generated/`` with ``reject_reason`` (null = kept; see ``filters``)."""
    import ray

    from .filters import duplicate_ids

    gen = out / GENERATED_DIR
    ds = ray.data.read_parquet(gen.uri, filesystem=gen.fs)
    dupes = frozenset(duplicate_ids(ds)) if cfg.filter.duplicates else frozenset()
    return ds.map_batches(_tag, batch_format="pyarrow", fn_kwargs=dict(cfg_json=cfg.model_dump_json(), duplicates=dupes))


def _write_filtered(tagged, out: StoragePath) -> None:
    """Step 4: kept answers to ``data/``, rejected ones (with their reason) to ``rejects/``."""
    data, rejects = out / DATA_DIR, out / REJECTS_DIR
    data.delete()
    rejects.delete()
    tagged.map_batches(_kept, batch_format="pyarrow", batch_size=None).write_parquet(data.uri, filesystem=data.fs)
    tagged.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(rejects.uri, filesystem=rejects.fs)


def _settings(cfg: Config, teacher_tokenizer: str | None) -> dict:
    """What every run adding rows to one corpus must share."""
    return {"teacher": cfg.teacher.model, "engine": cfg.teacher.engine, "teacher_tokenizer": teacher_tokenizer,
            "generation": cfg.generation.model_dump(exclude={"max_error_share"}),
            "data": cfg.data.model_dump(mode="json"), "task_prompts": cfg.task_prompts.model_dump(mode="json")}


def _check_settings(out: StoragePath, settings: dict) -> None:
    file = out / SETTINGS
    if not file.is_file():
        file.write_text(json.dumps(settings, indent=2, sort_keys=True))
        return
    before = json.loads(file.read_text())
    changed = []
    for section in sorted(set(before) | set(settings)):
        a, b = before.get(section), settings.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changed.append(f"{section}: {a!r} -> {b!r}")
    if changed:
        raise GenerationError(f"{out} holds an unfinished generation made with other settings ({'; '.join(changed[:8])}); "
                              "rerun with those settings to continue it, or with --overwrite to start again")


def _run_history(out: StoragePath, rows_now: int) -> list[dict]:
    runs = sorted((json.loads(f.read_text()) for f in (out / RUNS_DIR).files(".json")), key=lambda r: r["started"])
    for run, nxt in zip(runs, runs[1:] + [None]):
        run["rows_added"] = (nxt["rows_before"] if nxt else rows_now) - run["rows_before"]
    return runs


def _cleanup(out: StoragePath) -> None:
    for name in (GENERATED_DIR, CHECKPOINT_DIR):
        (out / name).delete()


def run_generate(cfg: Config, overwrite: bool = False) -> dict:
    """Answer the train and validation prompts with the teacher and write ``corpus/`` (see the
    module docstring for the steps and ``raydistill.corpus`` for the layout).

    A rerun continues an unfinished corpus (same settings required, else GenerationError) and
    returns a finished one unchanged; ``overwrite`` deletes the corpus first.

    Returns the manifest: ``rows`` (kept), ``rows_generated``, ``rejects`` (reason → rows),
    ``finish_reasons``, ``splits`` (kept rows per split), ``prompts_by_split``, ``prompts``
    (answered), ``prompt_tokens`` / ``response_tokens`` (all answers), ``seconds`` (this run's
    generation wall time, engine start-up included), ``tokens_per_s`` (response tokens / seconds,
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
    from .common import _stop_ids
    from .filters import REASONS

    out = corpus_location(cfg)
    if overwrite and out.exists():
        log.info("generate: --overwrite: deleting %s", out)
        out.delete()
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _cleanup(out)
        log.info("generate: %s is complete (%d rows kept of %d); nothing to do (--overwrite starts again)",
                 out, manifest["rows"], manifest["rows_generated"])
        return manifest
    precheck_sample(cfg)  # line-exact errors before any job
    if cfg.teacher.engine == "openai":
        teacher_model = cfg.teacher.model
        tokenizer_ref = cfg.teacher.tokenizer
        stop_ids: list[int] = []
    else:
        from ..models import resolve_model

        teacher_model = tokenizer_ref = resolve_model(cfg.teacher.model)
        stop_ids = sorted(_stop_ids(teacher_model))
    teacher_tokenizer = None
    if tokenizer_ref:
        from transformers import AutoTokenizer

        from ..models import resolve_model

        teacher_tokenizer = tokenizer_fingerprint(AutoTokenizer.from_pretrained(resolve_model(tokenizer_ref)))
    _check_settings(out, _settings(cfg, teacher_tokenizer))
    init_ray()
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    rows_before = _committed_rows(out)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / RUNS_DIR / f"{run_id}.json").write_text(json.dumps({"run": run_id, "started": started,
                                                               "rows_before": rows_before}))
    if rows_before:
        log.info("generate: continuing %s: %d answers already written are kept", out, rows_before)

    prompts_info = _write_prompts(cfg, out)
    by_split = prompts_info["by_split"]
    to_answer = by_split["train"] + by_split["validation"]
    if to_answer == 0:
        raise GenerationError("no prompts in the train/validation splits; lower data.split.test or add data")
    t0 = time.perf_counter()
    _generate(cfg, out, teacher_model, to_answer - rows_before)
    seconds = time.perf_counter() - t0

    tagged = _tagged(cfg, out)
    stats = _stats(tagged)
    rows_generated = sum(r["count()"] for r in stats)
    if rows_generated != to_answer:
        raise GenerationError(f"corpus/generated/ holds {rows_generated} answers for {to_answer} prompts; rerun to "
                              "continue, or --overwrite to start again")
    _check_errors(tagged, stats, cfg.generation.max_error_share)
    _write_filtered(tagged, out)
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
    runs = _run_history(out, rows_generated)
    this_run_all = rows_before == 0
    price = cfg.teacher.price_per_mtok
    data_settings = cfg.data.model_dump(mode="json")
    data_settings["resolved_path"] = str(prompt_files(cfg)[0][0].uri if cfg.data.path != "builtin:demo" else "builtin:demo")
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
        "seconds": round(seconds, 2),
        "tokens_per_s": round(response_tokens / seconds, 2) if this_run_all and seconds > 0 else None,
        "cost_usd": (round(prompt_tokens / 1e6 * price.input + response_tokens / 1e6 * price.output, 4)
                     if price else None),
        "runs": runs,
        "teacher": cfg.teacher.model,
        "teacher_tokenizer": teacher_tokenizer,
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the corpus complete
    _cleanup(out)
    log.info("generate: %d answers (%s); kept %d, rejected %d (%s); %d response tokens; this run added %d rows "
             "in %.1f s -> %s", rows_generated, ", ".join(f"{k} {v}" for k, v in finish.items()), manifest["rows"],
             sum(rejects.values()), ", ".join(f"{k} {v}" for k, v in rejects.items() if v) or "none",
             response_tokens, runs[-1]["rows_added"] if runs else rows_generated, seconds, out)
    return manifest
