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
   (``answer.answer_dataset``) in blocks of one engine batch and are written to
   ``corpus/generated/`` in files of ``generation.rows_per_file`` answers. Ray Data's
   row-level checkpointing (``ray.data.checkpoint.CheckpointConfig``, keyed by ``prompt_id``,
   two-phase commit per shard) records what was written, so a rerun after a crash or a kill
   answers only the prompts not yet written: every prompt id ends up exactly once.
3. **Errors.** A row the engine failed on is never committed as done: it goes to ``corpus/errors/``
   (this run's failures, outside the checkpoint), so the next run answers it again. When more
   than ``generation.max_error_rate`` of the last ``generation.error_window`` requests failed (an
   API outage, a dead engine), the run stops early, keeping every answer written, with the rate and
   what was kept. At the end of a run, when more than ``generation.max_error_share`` of the
   prompts failed, the job stops (the message gives the share and the first errors); below it the
   failed rows become rejects with reason ``error``.
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
from ..runtime import group_totals, shuffle_partitions
from ..schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform
from ..storage import StoragePath

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "_checkpoint"
ERRORS_DIR = "errors"  # this run's failed rows: outside the checkpoint, so a rerun answers them again
RUNS_DIR = "_runs"
SETTINGS = "_settings.json"
PRECHECK_ROWS = 1000  # rows of the first file checked line by line before the job
PRECHECK_MAX_BYTES = 64 * 2**20  # a first file larger than this is not read on the driver
#: generation settings that decide when to stop or fail and how files are cut, not what is generated
_CHECKS_ONLY = {"max_error_share", "max_error_rate", "error_window", "min_kept_share", "rows_per_file"}
SHARD_ROWS = 50_000  # rows per file of data/ and rejects/ (at least; the last may be smaller)


class GenerationError(ValueError):
    """Generation cannot go on: too many failed rows, settings changed under a resumed corpus,
    duplicate prompt ids. Rows already written are kept."""


class _StopGeneration(GenerationError):
    """Raised inside the Ray Data job when the recent error rate passed ``generation.max_error_rate``."""


# ----------------------------------------------------------------------------- prompt files

def prompt_files(cfg: Config) -> tuple[list[StoragePath], str]:
    """The prompt files behind ``data.path`` and their format (suffix).

    ``data.path`` is a file, a folder (every file with a prompt-file suffix under it) or a glob
    in its last component (``s3://bucket/prompts/part-*.jsonl``); local or ``s3://``.
    Raises DataError when nothing matches, the files mix formats, or a parquet file has a
    pickled-object column (``data.check_parquet_files``: every file's footer is read).
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
    if suffixes[0] == ".parquet":
        from ..data import check_parquet_files

        check_parquet_files(files)  # footers only, before any reader: a pickled-object column is code
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


def _shown(path: str, remote: bool) -> str:
    """A path Ray Data reports (``bucket/key`` on S3) as the user wrote it (``s3://bucket/key``)."""
    return f"s3://{path}" if remote and not path.startswith("s3://") else path


def _prompt_dataset(files: list[StoragePath], suffix: str, cfg: Config, rank_seed: int | None):
    """Prompt rows (``PROMPTS_SCHEMA``, plus ``_rank`` when sampling) from the prompt files, lazily.

    .jsonl, .json and .csv files are read as bytes, one file per task, and parsed with
    ``data.parse_records`` (what ``raydistill validate`` uses), so an error names the file and the
    line; shard big inputs into several files. Parquet is read row group by row group in Ray tasks
    (``_read_row_groups``): an unreadable one is named with its file and row group, a bad row with
    its file and id. Raises DataError when the parquet files hold no row at all."""
    import ray

    from ..data import DataError

    uris = [f.uri for f in files]
    fs = files[0].fs
    kwargs = dict(data=cfg.data.model_dump(), task_prompts=cfg.task_prompts.model_dump(), rank_seed=rank_seed,
                  remote=files[0].remote, suffix=suffix, source=cfg.data.path)
    if suffix == ".parquet":
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        with ThreadPoolExecutor(max_workers=16) as pool:  # footers only (prompt_files read them already)
            metas = list(pool.map(lambda f: pq.read_metadata(f.path, filesystem=fs), files))
        # the file column is named "path" unless a file has a column of that name
        with_paths = not any("path" in m.schema.names for m in metas)
        units = [{"file": f.path, "row_group": g} for f, m in zip(files, metas) for g in range(m.num_row_groups)]
        if not units:
            raise DataError(f"{cfg.data.path}: the dataset is empty (no rows in {len(files)} parquet file(s))")
        ds = ray.data.from_items(units).map_batches(
            _read_row_groups, batch_format="pyarrow", batch_size=1,
            fn_kwargs=dict(fs=fs, remote=files[0].remote, with_paths=with_paths))
        return ds.map_batches(_prompt_batch, batch_format="pyarrow", batch_size=1024,
                              fn_kwargs=dict(kwargs, with_paths=with_paths))
    ds = ray.data.read_binary_files(uris, filesystem=fs, include_paths=True)
    return ds.map_batches(_prompt_batch, batch_format="pyarrow", batch_size=1, fn_kwargs=dict(kwargs, with_paths=True))


#: Tries of one row group whose read failed with an error Ray Data itself retries
#: (``DataContext.retried_io_errors``: S3 throttling, a dropped connection), before giving up.
READ_TRIES = 4


def _read_row_groups(units: pa.Table, fs, remote: bool, with_paths: bool) -> pa.Table:
    """The rows of each (``file``, ``row_group``) of ``units``, plus their file in a ``path``
    column when ``with_paths``. A row group that cannot be read (a file whose footer reads but whose
    pages do not) is a DataError naming the file and the row group; transient storage errors (those
    Ray Data retries, ``DataContext.retried_io_errors``) are retried first, with 1, 2, 4 s pauses."""
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from ..data import DataError

    transient = tuple(DataContext.get_current().retried_io_errors)
    out = []
    for path, group in zip(units.column("file").to_pylist(), units.column("row_group").to_pylist()):
        shown = _shown(path, remote)
        for attempt in range(READ_TRIES):
            try:
                with fs.open_input_file(path) as f:
                    table = pq.ParquetFile(f).read_row_group(group)
                break
            except Exception as e:  # pyarrow raises several types for corrupt files
                if attempt + 1 < READ_TRIES and any(t in str(e) for t in transient):
                    time.sleep(2 ** attempt)
                    continue
                raise DataError(f"{shown}: cannot read parquet (row group {group}): {e}") from None
        if with_paths:
            table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
        out.append(table)
    return pa.concat_tables(out) if len(out) > 1 else out[0]


def _sample_rank(pid: str, seed: int) -> int:
    """The rank ``data.sample_by_task`` orders a task's prompts by (first 8 bytes of the same hash)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:sample:{pid}".encode()).digest()[:8], "big")


def _prompt_batch(batch: pa.Table, data: dict, task_prompts: dict, rank_seed: int | None, remote: bool,
                  suffix: str, source: str, with_paths: bool) -> pa.Table:
    """One Ray Data batch -> prompt rows: records of a parquet batch, or the parsed files of a
    batch of (``bytes``, ``path``) rows."""
    from ..data import _parquet_rows, make_prompts, parse_records

    if suffix == ".parquet":
        files = sorted({_shown(p, remote) for p in batch.column("path").to_pylist()}) if with_paths else [source]
        records = _parquet_rows(batch, ", ".join(files), first_row=None)
        if with_paths:
            for r in records:
                r["__source__"] = _shown(r.pop("path"), remote)
    else:
        records = []
        for path, blob in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
            shown = _shown(path, remote)
            rows = parse_records(blob, suffix, shown)
            for r in rows:
                r["__source__"] = shown
            records += rows
    table = make_prompts(records, DataConfig.model_validate(data), TaskPromptsConfig.model_validate(task_prompts), source)
    if rank_seed is not None:
        ranks = [_sample_rank(p, rank_seed) for p in table.column("prompt_id").to_pylist()]
        table = table.append_column("_rank", pa.array(ranks, pa.uint64()))
    return table


def _threshold(group: pa.Table, quotas: dict[str, int]) -> pa.Table:
    """Per task: the largest sample rank kept (uint64) and how many rows are kept."""
    import numpy as np

    task = group.column("task")[0].as_py()
    ranks = np.sort(group.column("_rank").to_numpy())
    keep = min(quotas.get(task, 0), len(ranks))
    return pa.table({"task": [task], "threshold": pa.array([int(ranks[keep - 1]) if keep else 0], pa.uint64()),
                     "keep": [keep]})


def _below(batch: pa.Table, thresholds: dict[str, tuple[int, int]]) -> pa.Table:
    ranks = batch.column("_rank").to_pylist()
    tasks = batch.column("task").to_pylist()
    mask = [t in thresholds and thresholds[t][1] > 0 and r <= thresholds[t][0] for t, r in zip(tasks, ranks)]
    return batch.filter(pa.array(mask, pa.bool_())).drop_columns(["_rank"])


def _write_prompts(cfg: Config, out: StoragePath) -> dict:
    """Step 1: ``corpus/prompts/`` (every prompt with its split); returns its ``_COMPLETE`` record."""
    import ray

    from ..data import SPLIT_RULE, DataError

    folder = out / PROMPTS_DIR
    if (folder / COMPLETE).is_file():
        info = json.loads((folder / COMPLETE).read_text())
        log.info("generate: prompts/ already written (%d prompts); reusing its split (rule: %s)", info["rows"],
                 info.get("split_rule", "by prompt id, an older rule"))
        return info
    folder.delete()
    files, suffix = prompt_files(cfg)
    log.info("generate: reading %d prompt file(s) (%s) from %s", len(files), suffix, cfg.data.path)
    limit = cfg.data.limit
    ds = _prompt_dataset(files, suffix, cfg, rank_seed=cfg.data.seed if limit else None)
    if limit:
        from ..data import task_quotas

        counts = {r["task"]: r["count"] for r in group_totals(ds, ["task"])}
        quotas = task_quotas(counts, limit)
        rows = (ds.select_columns(["task", "_rank"]).groupby("task", num_partitions=1)
                .map_groups(partial(_threshold, quotas=quotas), batch_format="pyarrow").take_all())
        thresholds = {r["task"]: (int(r["threshold"]), int(r["keep"])) for r in rows}
        log.info("generate: data.limit=%d keeps %s of %d prompts", limit,
                 ", ".join(f"{t} {q}/{counts[t]}" for t, q in sorted(quotas.items())), sum(counts.values()))
        ds = ds.map_batches(_below, batch_format="pyarrow", fn_kwargs=dict(thresholds=thresholds))
    try:
        ds.write_parquet(folder.uri, filesystem=folder.fs)
    except DataError as e:
        # A bad row found on a worker: Ray raises it as a RayTaskError that is also a DataError,
        # whose text is the worker's traceback; the message users need is the original's.
        cause = getattr(e, "cause", None)
        text = str(cause if isinstance(cause, DataError) else e)
        raise DataError(text.split("\nFailed to apply UDF transform")[0]) from None  # Ray appends retry advice
    written = ray.data.read_parquet(folder.uri, filesystem=folder.fs)
    dupes = (written.groupby("prompt_id", num_partitions=shuffle_partitions(written.count())).count()
             .filter(lambda r: r["count()"] > 1).take(10))
    if dupes:
        folder.delete()
        raise DataError(f"{cfg.data.path}: duplicate prompt id(s) {[d['prompt_id'] for d in dupes]}; prompt ids must "
                        "be unique (without data.id_field they are hashed from the prompt text, so the text repeats)")
    by_split = {r["split"]: r["count"] for r in group_totals(written, ["split"])}
    if not by_split:
        raise DataError(f"{cfg.data.path}: the dataset is empty (no rows)")
    info = {"rows": sum(by_split.values()), "by_split": {s: by_split.get(s, 0) for s in ("train", "validation", "test")},
            "inputs": {"files": len(files), "format": suffix, "first": files[0].uri, "last": files[-1].uri},
            "split_rule": SPLIT_RULE}  # how the split was decided (none recorded: by prompt id, an older rule)
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


class _ErrorWindow:
    """A Ray actor counting the outcomes of the last ``window`` requests (answered prompts, in the
    order their batches finished); ``add`` returns the stop message once more than ``max_rate`` of
    them failed, and keeps returning it."""

    def __init__(self, window: int, max_rate: float):
        from collections import deque

        self.window, self.max_rate = window, max_rate
        self.recent: deque[bool] = deque()
        self.in_window = self.seen = self.failed = 0
        self.stop: str | None = None

    def add(self, failed: list[bool], last_error: str | None) -> str | None:
        if self.stop:
            return self.stop
        for f in failed:
            self.recent.append(f)
            self.in_window += f
            if len(self.recent) > self.window:
                self.in_window -= self.recent.popleft()
            self.seen += 1
            self.failed += f
            if len(self.recent) == self.window and self.in_window > self.max_rate * self.window:
                self.stop = (f"{self.in_window} of the last {self.window} requests failed "
                             f"({self.in_window / self.window:.0%}, more than generation.max_error_rate="
                             f"{self.max_rate:.0%} over generation.error_window={self.window}) after {self.seen} "
                             f"requests of this run; last error: {str(last_error)[:300]}")
                break
        return self.stop


def _route_errors(batch: pa.Table, monitor, errors: StoragePath) -> pa.Table:
    """After the engine: failed rows go to ``errors/`` (not checkpointed, so a rerun answers them
    again) and are counted by the ``_ErrorWindow`` actor ``monitor``; answers go on to be written.
    Raises _StopGeneration when the recent error rate passed ``generation.max_error_rate``."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    failed = pc.fill_null(pc.or_kleene(pc.equal(batch.column("finish_reason"), "error"),
                                       pc.is_valid(batch.column("error"))), False)
    bad = batch.filter(failed)
    last_error = None
    # Named by the batch's ids: a retried task replaces its own file (or removes it when the retry
    # failed nowhere), so errors/ holds each batch's last attempt, disjoint from the answers written.
    name = hashlib.sha256("\n".join(sorted(batch.column("prompt_id").to_pylist())).encode()).hexdigest()[:32]
    if bad.num_rows:
        last_error = next((e for e in reversed(bad.column("error").to_pylist()) if e), "no error message")
        buf = io.BytesIO()
        pq.write_table(bad, buf)
        (errors / f"{name}.parquet").write_bytes(buf.getvalue())
    else:
        (errors / f"{name}.parquet").delete()
    stop = ray.get(monitor.add.remote(failed.to_pylist(), last_error))
    if stop:
        raise _StopGeneration(stop)
    return batch.filter(pc.invert(failed))


def _cause(e: BaseException, kind: type) -> BaseException | None:
    """The innermost exception of type ``kind`` in ``e``'s chain, or None. Ray raises a worker's
    exception as a RayTaskError that is also a ``kind`` but whose text is the traceback; the
    original (with the message) is its ``cause``."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            found = e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return found


def _generate(cfg: Config, out: StoragePath, teacher_model: str, to_answer: int) -> None:
    """Step 2: answer the train/validation prompts not yet written into ``corpus/generated/``;
    failed rows go to ``corpus/errors/``. Raises GenerationError when the run stopped early on
    ``generation.max_error_rate`` (what was kept and what is left are in the message)."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from .answer import answer_dataset

    stop = monitor = None
    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="prompt_id", checkpoint_path=(out / CHECKPOINT_DIR).uri, override_filesystem=out.fs,
        delete_checkpoint_on_success=False)  # the manifest step removes it, after the filter pass
    try:
        prompts = out / PROMPTS_DIR
        ds = ray.data.read_parquet(prompts.uri, filesystem=prompts.fs)
        # Blocks of one engine batch, so that every replica gets work; the writer bundles them
        # into files of generation.rows_per_file answers.
        ds = ds.map_batches(_not_test, batch_format="pyarrow", batch_size=None)
        ds = ds.repartition(target_num_rows_per_block=cfg.teacher.batch_size)
        answered = answer_dataset(ds, teacher_model, cfg.teacher, cfg.generation)
        params = json.dumps(cfg.generation.model_dump(), sort_keys=True)
        answered = answered.map_batches(_corpus_batch, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs=dict(teacher=cfg.teacher.model, params=params))
        monitor = ray.remote(num_cpus=0)(_ErrorWindow).remote(cfg.generation.error_window,
                                                               cfg.generation.max_error_rate)
        answered = answered.map_batches(_route_errors, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs=dict(monitor=monitor, errors=out / ERRORS_DIR))
        gen = out / GENERATED_DIR
        log.info("generate: answering up to %d prompts with %s (engine %s) -> %s", to_answer, cfg.teacher.model,
                 cfg.teacher.engine, gen)
        try:
            # Files of generation.rows_per_file answers, each committed on its own: far fewer objects
            # than one per engine batch, and a kill redoes only the files being written.
            answered.write_parquet(gen.uri, filesystem=gen.fs, min_rows_per_file=cfg.generation.rows_per_file)
        except Exception as e:
            found = _cause(e, _StopGeneration)
            if found is None:
                raise
            stop = str(found).split("\nFailed to apply UDF transform")[0]  # Ray appends retry advice
    finally:
        ctx.checkpoint_config = None
        if monitor is not None:  # Ray Data's plan keeps a handle: without this the actor outlives the run
            ray.kill(monitor)
    if stop:
        kept = _committed_rows(out)
        failed = _count_rows(out / ERRORS_DIR)
        total = _prompt_count(out)
        raise GenerationError(
            f"generation stopped early: {stop}. Kept: {kept} answers of {total} prompts in corpus/generated/ "
            f"(committed); {total - kept} prompts ({failed} failed, {max(0, total - kept - failed)} not "
            "reached) are answered by the next run: fix the cause (the endpoint, the engine) and rerun "
            "`raydistill generate` with the same settings")


def _count_rows(folder: StoragePath) -> int:
    """Rows in the parquet files under ``folder`` (from their footers, in Ray Data); 0 if none."""
    import ray

    files = [f.uri for f in folder.files(".parquet")]
    return ray.data.read_parquet(files, filesystem=folder.fs).count() if files else 0


def _prompt_count(out: StoragePath) -> int:
    """Train + validation prompts of the corpus (``prompts/_COMPLETE``)."""
    by_split = json.loads((out / PROMPTS_DIR / COMPLETE).read_text())["by_split"]
    return by_split["train"] + by_split["validation"]


def _settle_checkpoints(out: StoragePath) -> None:
    """Finish commits a kill interrupted. Ray Data commits a shard by renaming its checkpoint file
    from ``X.pending.parquet`` to ``X.parquet``; on S3 a rename is copy + delete, so a kill between
    the two leaves both, and Ray's recovery would then delete the shard's data while its ids stay
    marked done. Both present = committed: drop the pending file, as the commit would have."""
    folder = out / CHECKPOINT_DIR
    names = {f.name for f in folder.files(".parquet")}
    for f in folder.files(".pending.parquet"):
        if f.name.replace(".pending.parquet", ".parquet") in names:
            f.delete()


def _committed_rows(out: StoragePath) -> int:
    """Rows whose shard is committed (Ray Data's checkpoint files, pending ones left out),
    counted by Ray Data from the parquet footers."""
    import ray

    files = [f.uri for f in (out / CHECKPOINT_DIR).files(".parquet") if not f.name.endswith(".pending.parquet")]
    return ray.data.read_parquet(files, filesystem=out.fs).count() if files else 0


# ----------------------------------------------------------------------------- stats and manifest

def _stats(tagged) -> list[dict]:
    """Rows and token sums per (split, finish_reason, reject reason or "kept"): a few rows, whatever
    the corpus size (``runtime.group_totals``: per-block aggregates, summed on the driver)."""
    def outcome(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.select(["split", "finish_reason", "prompt_tokens", "response_tokens"]).append_column(
            "outcome", pc.fill_null(batch.column("reject_reason"), "kept"))

    rows = group_totals(tagged.map_batches(outcome, batch_format="pyarrow", batch_size=None),
                        ["split", "finish_reason", "outcome"], ("prompt_tokens", "response_tokens"))
    return [{"split": r["split"], "finish_reason": r["finish_reason"], "outcome": r["outcome"], "count()": r["count"],
             "sum(prompt_tokens)": r["sum_prompt_tokens"], "sum(response_tokens)": r["sum_response_tokens"]}
            for r in rows]


def _check_errors(gen, stats: list[dict], max_share: float) -> None:
    total = sum(r["count()"] for r in stats)
    failed = sum(r["count()"] for r in stats if r["finish_reason"] == "error")
    if total and failed / total > max_share:
        first = (gen.filter(lambda r: r["finish_reason"] == "error").select_columns(["prompt_id", "error"]).take(5))
        examples = "; ".join(f"{r['prompt_id']}: {str(r['error'])[:200]}" for r in first)
        raise GenerationError(
            f"{failed} of {total} answers failed ({failed / total:.1%}), more than generation.max_error_share="
            f"{max_share:.0%}; first errors: {examples}. The answers written are kept; the failed prompts are "
            "answered again by the next run: fix the cause (e.g. teacher.max_model_len) and rerun, or raise "
            "generation.max_error_share to keep them as rejects")
    if failed:
        log.warning("generate: %d of %d answers failed (%.1f%%; generation.max_error_share=%.0f%%); they go to "
                    "corpus/rejects/ with reason 'error'", failed, total, 100 * failed / total, 100 * max_share)


WARN_KEPT_SHARE = 0.7  # below this kept share generate warns (Azure's batch jobs fail under 70 % success)

_ADVICE = {
    "error": "the engine failed on these prompts: see the first errors in corpus/errors/ and fix the cause",
    "empty": "the teacher answered with nothing: check its chat template and the prompts, or set filter.empty=false",
    "truncated": "answers were cut: raise generation.max_new_tokens (or teacher.max_model_len), or set "
                 "filter.truncated=false to keep cut answers",
    "no_final_answer": "the teacher's math/QA/NLI answers state no final answer (task_prompts.final_answer_marker): "
                       "check the task prompts (task_prompts, data.system_prompt) or set filter.no_final_answer=false",
    "reference_mismatch": "the teacher disagrees with the references: check data.reference_field and "
                          "data.label_map, or set filter.match_reference=false",
    "duplicate": "the teacher gave identical answers to identical prompts: deduplicate the prompts, or set "
                 "filter.duplicates=false",
}


def _check_kept(stats: list[dict], cfg: Config) -> None:
    """Refuse a corpus the filters leave (almost) nothing of, before anything is written to
    ``data/``: no train answer kept, or a kept share below ``generation.min_kept_share``; warn
    below ``WARN_KEPT_SHARE``. The message gives the reject counts per reason, the finish-reason
    counts and the setting to change (``generation.max_new_tokens`` when most answers were cut).

    ``stats``: rows of ``_stats`` (``split``, ``finish_reason``, ``outcome``, ``count()``).
    Raises GenerationError."""
    total = sum(r["count()"] for r in stats)
    if not total:
        return
    kept = sum(r["count()"] for r in stats if r["outcome"] == "kept")
    kept_train = sum(r["count()"] for r in stats if r["outcome"] == "kept" and r["split"] == "train")
    floor = cfg.generation.min_kept_share
    share = kept / total
    if kept_train and share >= floor and share >= WARN_KEPT_SHARE:
        return
    rejects: dict[str, int] = {}
    finish: dict[str, int] = {}
    for r in stats:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + r["count()"]
        if r["outcome"] != "kept":
            rejects[r["outcome"]] = rejects.get(r["outcome"], 0) + r["count()"]
    cut = finish.get("length", 0)
    advice = []
    if cut * 2 > total:  # most answers ran into the length limit: the usual cause of every other reason
        advice.append(f"{'every' if cut == total else 'most'} answer{'' if cut == total else 's'} ({cut} of {total}) "
                      f"ran into generation.max_new_tokens={cfg.generation.max_new_tokens} (finish_reason 'length'): "
                      "raise generation.max_new_tokens (or teacher.max_model_len, when prompts are long)")
    for reason, n in sorted(rejects.items(), key=lambda kv: -kv[1]):
        if not (advice and reason in ("truncated", "no_final_answer")):
            advice.append(f"{reason}: {_ADVICE[reason]}")
            break
    what = (f"{kept} of {total} answers ({share:.0%}) pass the filters"
            + ("" if kept_train or not kept else ", none of them in the train split")
            + f"; rejected: {', '.join(f'{k} {v}' for k, v in sorted(rejects.items(), key=lambda kv: -kv[1]))}"
            + f"; finish reasons: {', '.join(f'{k} {v}' for k, v in sorted(finish.items(), key=lambda kv: -kv[1]))}"
            + f". To change: {'; '.join(advice)}")
    if not kept_train or share < floor:
        why = "no usable train answer" if not kept_train else f"below generation.min_kept_share={floor:.0%}"
        raise GenerationError(
            f"generate: {why}: {what}. The answers stay in corpus/generated/: a filter change applies on the "
            "next run without generating again; a generation or teacher change needs --overwrite")
    log.warning("generate: only %s (below %.0f%%; generation.min_kept_share fails the job below a floor)", what,
                100 * WARN_KEPT_SHARE)


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


def _filter_config(cfg: Config) -> Config:
    """``cfg`` with ``filter.no_final_answer`` off when no task prompt asks for a final answer
    (``data.system_prompt`` replaces them, or ``task_prompts.enabled`` is false)."""
    if cfg.filter.no_final_answer and (cfg.data.system_prompt or not cfg.task_prompts.enabled):
        log.info("generate: filter.no_final_answer is skipped: the prompts carry no task prompt asking for a "
                 "final answer (data.system_prompt is set or task_prompts.enabled is false)")
        return cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"no_final_answer": False})})
    return cfg


def _generated(out: StoragePath):
    """Every answer of ``generated/`` and this run's failed rows of ``errors/``, lazily (disjoint:
    see ``_route_errors``; ``run_generate`` checks that they add up to the prompts)."""
    import ray

    gen, errs = out / GENERATED_DIR, out / ERRORS_DIR
    answers = [f.uri for f in gen.files(".parquet")]
    failed = [f.uri for f in errs.files(".parquet")]
    parts = []
    if answers:
        parts.append(ray.data.read_parquet(answers, filesystem=gen.fs))
    if failed:
        parts.append(ray.data.read_parquet(failed, filesystem=errs.fs))
    if not parts:
        return ray.data.from_arrow(CORPUS_SCHEMA.empty_table())
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _tagged(cfg: Config, out: StoragePath):
    """Every answer in ``generated/`` (and failed row in ``errors/``) with ``reject_reason``
    (null = kept; see ``filters``). Duplicates are looked for among the answers the other reasons
    keep, so an answer is never rejected as the duplicate of a rejected one."""
    from .filters import duplicate_ids

    cfg = _filter_config(cfg)
    ds = _generated(out)
    dupes: frozenset[str] = frozenset()
    if cfg.filter.duplicates:
        first = ds.map_batches(_tag, batch_format="pyarrow",
                               fn_kwargs=dict(cfg_json=cfg.model_dump_json(), duplicates=frozenset()))
        dupes = frozenset(duplicate_ids(first.map_batches(_kept, batch_format="pyarrow", batch_size=None),
                                        partitions=shuffle_partitions(ds.count())))
    return ds.map_batches(_tag, batch_format="pyarrow", fn_kwargs=dict(cfg_json=cfg.model_dump_json(), duplicates=dupes))


def _write_filtered(tagged, out: StoragePath) -> None:
    """Step 4: kept answers to ``data/``, rejected ones (with their reason) to ``rejects/``."""
    data, rejects = out / DATA_DIR, out / REJECTS_DIR
    data.delete()
    rejects.delete()
    # Few large shards for the stages that read them (generated/ holds one shard per engine batch).
    tagged.map_batches(_kept, batch_format="pyarrow", batch_size=None).write_parquet(
        data.uri, filesystem=data.fs, min_rows_per_file=SHARD_ROWS)
    tagged.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(
        rejects.uri, filesystem=rejects.fs, min_rows_per_file=SHARD_ROWS)
    for folder in (data, rejects):  # Ray writes nothing for no rows: the layout stays the same
        folder.mkdir()


def _settings(cfg: Config, teacher_tokenizer: str | None) -> dict:
    """What every run adding rows to one corpus must share (``data.label_map`` only affects
    scoring; ``filter`` is compared for a finished corpus only: an unfinished one filters again)."""
    return {"teacher": cfg.teacher.model, "engine": cfg.teacher.engine, "teacher_tokenizer": teacher_tokenizer,
            "generation": cfg.generation.model_dump(exclude=_CHECKS_ONLY),
            "data": cfg.data.model_dump(mode="json", exclude={"label_map"}),
            "task_prompts": cfg.task_prompts.model_dump(mode="json"), "filter": cfg.filter.model_dump()}


def _check_settings(out: StoragePath, settings: dict, finished: bool = False) -> None:
    """Refuse to continue (or to reuse, when ``finished``) a corpus made with other settings."""
    file = out / SETTINGS
    if not file.is_file():
        if not finished:
            file.write_text(json.dumps(settings, indent=2, sort_keys=True))
        return
    before = json.loads(file.read_text())
    if not finished:
        before.pop("filter", None)
        settings = {k: v for k, v in settings.items() if k != "filter"}
    elif "filter" not in before:
        before["filter"] = settings["filter"]
    from ..stages import differences

    changed = differences(before, settings)
    if changed and finished:
        raise GenerationError(f"{out} is a finished corpus made with other settings ({'; '.join(changed[:8])}); "
                              "rerun with --overwrite to generate it again with these, or restore them to use it")
    if changed:
        raise GenerationError(f"{out} holds an unfinished generation made with other settings ({'; '.join(changed[:8])}); "
                              "rerun with those settings to continue it, or with --overwrite to start again")


def _run_history(out: StoragePath, rows_now: int) -> list[dict]:
    runs = sorted((json.loads(f.read_text()) for f in (out / RUNS_DIR).files(".json")), key=lambda r: r["started"])
    for run, nxt in zip(runs, runs[1:] + [None]):
        run["rows_added"] = (nxt["rows_before"] if nxt else rows_now) - run["rows_before"]
    return runs


def _cleanup(out: StoragePath) -> None:
    for name in (GENERATED_DIR, CHECKPOINT_DIR, ERRORS_DIR):
        (out / name).delete()


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
    from .common import _stop_ids
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
        stop_ids = sorted(_stop_ids(teacher_model, cfg.storage))  # metadata files only
    teacher_tokenizer = None
    teacher_vocab_size = None
    if tokenizer_ref:
        from transformers import AutoTokenizer

        from ..models import model_metadata

        tok = AutoTokenizer.from_pretrained(model_metadata(tokenizer_ref, cfg.storage))  # no weights fetched
        teacher_tokenizer, teacher_vocab_size = tokenizer_fingerprint(tok), len(tok)
    settings = _settings(cfg, teacher_tokenizer)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _check_settings(out, settings, finished=True)
        _cleanup(out)
        log.info("generate: %s is complete (%d rows kept of %d); nothing to do (--overwrite starts again)",
                 out, manifest["rows"], manifest["rows_generated"])
        return manifest
    if not (out / PROMPTS_DIR / COMPLETE).is_file():
        precheck_sample(cfg)  # line-exact errors before any job (and before anything is written)
    _check_settings(out, settings)
    init_ray()
    _settle_checkpoints(out)
    (out / ERRORS_DIR).delete()  # an earlier run's failures: not committed, answered again now
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    rows_before = _committed_rows(out)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_file = out / RUNS_DIR / f"{run_id}.json"
    run_file.write_text(json.dumps({"run": run_id, "started": started, "rows_before": rows_before}))
    if rows_before:
        log.info("generate: continuing %s: %d answers already written are kept", out, rows_before)

    prompts_info = _write_prompts(cfg, out)
    by_split = prompts_info["by_split"]
    to_answer = by_split["train"] + by_split["validation"]
    if to_answer == 0:
        raise GenerationError("no prompts in the train/validation splits; lower data.split.test or add data")
    t0 = time.perf_counter()
    if rows_before < to_answer:  # else every answer is written: no engine to start
        _generate(cfg, out, teacher_model, to_answer - rows_before)
    seconds = time.perf_counter() - t0
    run_file.write_text(json.dumps({"run": run_id, "started": started, "rows_before": rows_before,
                                    "seconds": round(seconds, 2)}))

    tagged = _tagged(cfg, out)
    stats = _stats(tagged)
    rows_generated = sum(r["count()"] for r in stats)
    if rows_generated != to_answer:
        raise GenerationError(f"corpus/generated/ holds {rows_generated} answers for {to_answer} prompts; rerun to "
                              "continue, or --overwrite to start again")
    _check_errors(tagged, stats, cfg.generation.max_error_share)
    _check_kept(stats, _filter_config(cfg))
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
    _cleanup(out)
    log.info("generate: %d answers (%s); kept %d, rejected %d (%s); %d response tokens; this run added %d rows "
             "in %.1f s -> %s", rows_generated, ", ".join(f"{k} {v}" for k, v in finish.items()), manifest["rows"],
             sum(rejects.values()), ", ".join(f"{k} {v}" for k, v in rejects.items() if v) or "none",
             response_tokens, runs[-1]["rows_added"] if runs else rows_generated, seconds, out)
    return manifest
