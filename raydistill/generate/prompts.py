"""Step 1 of the generate stage: the prompt files of ``data.path`` to ``corpus/prompts/`` in one
Ray Data job (every prompt with its split; ``data.limit``'s seeded sample over the task types),
and the line-exact checks of the first file before it.

Records are parsed and turned into prompt rows by ``raydistill.data``; this module finds the
files, reads them in Ray Data and writes the folder. It does not answer prompts (``answering``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial

import pyarrow as pa

from ..config import Config, DataConfig, TaskPromptsConfig
from ..corpus import COMPLETE, PROMPTS_DIR
from ..runtime import group_totals, shuffle_partitions
from ..storage import StoragePath

log = logging.getLogger(__name__)

PRECHECK_ROWS = 1000  # rows of the first file checked line by line before the job
PRECHECK_MAX_BYTES = 64 * 2**20  # a first file larger than this is not read on the driver


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
    from ..data import make_prompts, parquet_rows, parse_records

    if suffix == ".parquet":
        files = sorted({_shown(p, remote) for p in batch.column("path").to_pylist()}) if with_paths else [source]
        records = parquet_rows(batch, ", ".join(files), first_row=None)
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


def write_prompts(cfg: Config, out: StoragePath) -> dict:
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
