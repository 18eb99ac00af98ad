"""Read prompt files, build chat messages, and split prompts stably.

Modules: ``files`` (prompt files to records, with their checks), ``values`` (``DataError``, how one
cell reads), ``rows`` (records to prompt rows: ``make_prompts``), ``split`` (the stable split and
``data.limit``'s sample); ``load_prompts`` here reads a whole local file through all of them.

Supported formats: ``.jsonl`` (one object per line), ``.json`` (a list of objects),
``.parquet`` and ``.csv`` (header row). Errors name the file, the line/row (the row's id when Ray Data
streams parquet, which has no line) and the field.

Cell values: a prompt must be text (a number, null, NaN or a list is an error naming the line and
field; a list of chat messages points to ``data.messages_field``, which reads a chat history). A reference or id that
is null, NaN or blank is missing; numbers become their natural text (``18``, ``0.75``; an integral
float such as parquet's ``18.0`` is ``18``), booleans ``true``/``false``; ±Infinity, lists and
objects are errors. A relative ``data.path`` is relative to the current directory.
"""

from __future__ import annotations

import pyarrow as pa

from ..config import DataConfig, TaskPromptsConfig
from .files import (
    FORMATS,
    PICKLED_EXTENSION_TYPES,
    check_parquet_files,
    check_parquet_schema,
    first_bad_text,
    parquet_rows,
    parse_records,
    pickled_columns,
    read_records,
    resolve_data_path,
)
from .rows import make_prompts
from .split import SPLIT_RULE, sample_by_task, select_split, split_key, split_of, task_quotas
from .values import DataError

__all__ = ["FORMATS", "PICKLED_EXTENSION_TYPES", "SPLIT_RULE", "DataError", "check_parquet_files",
           "check_parquet_schema", "first_bad_text", "load_prompts", "make_prompts", "parquet_rows", "parse_records",
           "pickled_columns", "read_records", "resolve_data_path", "sample_by_task", "select_split", "split_key",
           "split_of", "task_quotas"]


def load_prompts(cfg: DataConfig, task_prompts: TaskPromptsConfig | None = None) -> pa.Table:
    """Read, check, and split the prompt file into a table with ``PROMPTS_SCHEMA``.

    The whole local file is read on the driver and turned into rows by ``make_prompts`` (errors
    name the file and its line/row), then ``data.limit`` keeps a sample seeded by ``data.seed``
    and spread over the task types (``sample_by_task``), so duplicate ids are found across the
    whole file even when a limit is set, and a limit does not change any prompt's id or split.
    ``task_prompts``: the run's ``Config.task_prompts`` (each row starts with its task's system
    prompt); None = no task system prompts (only ``data.system_prompt``).

    Raises DataError for: a remote, missing or unreadable file, an empty dataset, a CSV row whose
    cell count differs from the header's, and every row error of ``make_prompts``.
    """
    path = resolve_data_path(cfg.path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    table = make_prompts(records, cfg, task_prompts, str(path))
    if cfg.limit is not None:
        table = sample_by_task(table, cfg.limit, cfg.seed)
    return table
