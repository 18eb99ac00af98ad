"""Read prompt files, build chat messages, and split prompts stably.

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

import csv
import decimal
import hashlib
import json
import math
import os
import re
import string
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import DEMO_DATA, REMOTE_PATH, TASKS, DataConfig, TaskPromptsConfig
from .schema import PROMPTS_SCHEMA

FORMATS = (".jsonl", ".json", ".parquet", ".csv")

class DataError(ValueError):
    """Bad prompt data; the message names the file and the row (1-based) or field."""


def resolve_data_path(path: str) -> Path:
    """The local file behind ``data.path``.

    ``builtin:demo`` is the packaged demo set; ``~`` expands; a relative path is relative to the
    current directory (not to the config file's folder). Raises DataError for a remote path
    (``s3://…``, printed as given) and for a missing file, saying what a relative path resolved to.
    """
    if path == DEMO_DATA:
        return Path(__file__).parent / "demo" / "prompts.jsonl"
    if REMOTE_PATH.match(path):  # before Path(), which would print s3://b/x as s3:/b/x
        raise DataError(f"data.path {path}: an s3:// path is read by `raydistill generate` (Ray Data); "
                        "this reads local files only")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        if resolved.is_absolute():
            raise DataError(f"data file not found: {path}")
        raise DataError(f"data file not found: {path} (resolved against the current directory "
                        f"{os.getcwd()}: {os.path.abspath(resolved)})")
    return resolved


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name.
    return path.open(encoding="utf-8-sig", newline="" if path.suffix.lower() == ".csv" else None)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read every row of a prompt file as a dict.

    Each dict carries ``__where__``: "line N" (.jsonl and .csv: the file line where the row
    starts, 1-based), "item N" (.json) or "row N" (.parquet), used in error messages. Raises
    DataError naming the file and the line/row for unreadable files, bad encodings, malformed
    JSON, non-objects, and CSV rows whose cell count differs from the header's.
    """
    if path.is_dir():
        raise DataError(f"data path {path} is a folder; give a file ({', '.join(FORMATS)})")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(FORMATS)}")
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        with _open_text(path) as f:
            return _parse(f, suffix, str(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None


def parse_records(data: bytes, suffix: str, name: str) -> list[dict[str, Any]]:
    """``read_records`` for the bytes of one .jsonl, .json or .csv file (Ray Data reads prompt
    files as bytes on its workers and parses them here, so a streamed run and ``raydistill
    validate`` read a file the same way). ``name`` is the file as errors show it."""
    import io

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None
    return _parse(io.StringIO(text, newline="" if suffix == ".csv" else None), suffix, name)


def _parse(f, suffix: str, path: str) -> list[dict[str, Any]]:
    """Rows of an open .jsonl, .json or .csv text stream; ``path`` names the file in errors."""
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if _SURROGATE_ESCAPE.search(line):
                _check_unicode(obj, f"{path}: line {lineno}")
            obj["__where__"] = f"line {lineno}"
            rows.append(obj)
        return rows
    if suffix == ".json":
        text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects at top level, got {type(data).__name__}")
        escapes = bool(_SURROGATE_ESCAPE.search(text))
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: item {i + 1}: expected a JSON object, got {type(obj).__name__}")
            if escapes:
                _check_unicode(obj, f"{path}: item {i + 1}")
            obj["__where__"] = f"item {i + 1}"
        return data
    if suffix == ".csv":
        return _read_csv(f, path)
    raise DataError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(FORMATS)}")


#: Arrow extension types whose values are pickled Python objects: reading one runs the pickle's
#: code (pyarrow unpickles Ray Data's type whenever ``ray.data`` has been imported in the process).
PICKLED_EXTENSION_TYPES = ("ray.data.arrow_pickled_object",)
_EXT_NAME = b"ARROW:extension:name"


def pickled_columns(schema: pa.Schema) -> list[str]:
    """Columns of ``schema`` (dotted paths for nested fields) that hold a pickled-object extension
    type (``PICKLED_EXTENSION_TYPES``), whether or not the type is registered in this process
    (an unregistered one keeps its name in the field metadata). Reads the schema only."""
    found = []

    def walk(field: pa.Field, path: str) -> None:
        dtype = field.type
        name = (field.metadata or {}).get(_EXT_NAME, b"").decode("utf-8", "replace")
        if isinstance(dtype, pa.ExtensionType):
            name = name or dtype.extension_name
            dtype = dtype.storage_type
        if name in PICKLED_EXTENSION_TYPES or "pickle" in name.lower():
            found.append(path)
            return
        if pa.types.is_dictionary(dtype):
            dtype = dtype.value_type
        for i in range(dtype.num_fields):
            child = dtype.field(i)
            walk(child, f"{path}.{child.name}")

    for field in schema:
        walk(field, field.name)
    return found


def check_parquet_schema(schema: pa.Schema, name: str) -> None:
    """Refuse a parquet file whose ``schema`` has a pickled-object column (``pickled_columns``):
    its values are code. Raises DataError naming the file ``name`` and the column(s)."""
    cols = pickled_columns(schema)
    if cols:
        raise DataError(f"{name}: column {', '.join(repr(c) for c in cols)} holds pickled Python objects (parquet "
                        f"extension type {PICKLED_EXTENSION_TYPES[0]!r}); reading it would run code stored in the "
                        "file, so raydistill refuses the file: write that column as text, numbers or lists instead")


def check_parquet_files(files: list) -> None:
    """``check_parquet_schema`` for every file of ``files`` (``storage.StoragePath``s, local or
    ``s3://``), reading only each file's footer (16 at a time). Raises DataError."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def schema(f):
        try:
            return pq.read_schema(f.path, filesystem=f.fs)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{f.uri}: cannot read parquet: {e}") from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        for f, s in zip(files, pool.map(schema, files)):
            check_parquet_schema(s, f.uri)


#: A JSON escape of a UTF-16 surrogate (\ud800-\udfff): a lone one decodes to text UTF-8 cannot hold.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def first_bad_text(value: Any, path: str = "") -> tuple[str, str, int] | None:
    """(field path, text, index) of the first string in ``value`` (nested dicts and lists) that
    is not valid Unicode (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, value, e.start
    elif isinstance(value, dict):
        for k, v in value.items():
            found = first_bad_text(str(k), path or "(a field name)") or first_bad_text(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = first_bad_text(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _check_unicode(rec: dict[str, Any], where: str) -> None:
    """Refuse a record holding a lone UTF-16 surrogate (JSON's ``"\ud83d"`` without its pair):
    no UTF-8 text can hold it, so pyarrow, tokenizers and the corpus would fail on it later.
    Raises DataError naming ``where`` (file and line), the field and the character."""
    found = first_bad_text(rec)
    if found:
        field, text, i = found
        context = text[max(0, i - 20):i].encode("utf-8", "replace").decode("utf-8")
        raise DataError(f"{where}: field {field!r} holds a lone surrogate \\u{ord(text[i]):04x} at character {i + 1} "
                        f"(after {context!r}): half of a UTF-16 pair is not Unicode text; fix the escape in the file "
                        "(a whole pair, e.g. \\ud83d\\ude00) or remove it")


def _parquet_rows(table: pa.Table, name: str, first_row: int | None = 1) -> list[dict[str, Any]]:
    """``table.to_pylist()``, or DataError naming the file, the row (``first_row`` = the number of
    the table's first row in the file; None when unknown, as in a Ray Data batch: then the row's
    position in the batch and its values' problem) and the field of a string that is not UTF-8."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    for col in table.column_names:
        column = table.column(col)
        try:
            column.to_pylist()
            continue
        except UnicodeDecodeError:
            pass
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as e:
                row = f"row {first_row + i}" if first_row is not None else f"a row (batch row {i + 1})"
                raise DataError(f"{name}: {row}: field {col!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                "rewrite the column with valid UTF-8 strings") from None
    raise DataError(f"{name}: a string is not UTF-8 text; rewrite the file with valid UTF-8 strings")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        file_schema = pq.read_schema(path)  # the footer only: nothing of the data is decoded
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    check_parquet_schema(file_schema, str(path))
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    rows = _parquet_rows(table, str(path))
    for i, row in enumerate(rows):
        row["__where__"] = f"row {i + 1}"
    return rows


def _read_csv(f, path: str) -> list[dict[str, Any]]:
    # csv.reader, not DictReader: DictReader files surplus cells under the key None and fills
    # missing ones with None, so an unquoted comma silently cut a prompt.
    csv.field_size_limit(2**31 - 1)  # long documents are legitimate prompts
    rows: list[dict[str, Any]] = []
    header: list[str] | None = None
    reader = csv.reader(f)
    end = 0  # the last file line read so far; a row starts on the line after it
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}: line {end + 1}: malformed CSV: {e}") from None
        start, end = end + 1, reader.line_num
        if not cells:  # a blank line
            continue
        if header is None:
            header = cells
            for i, name in enumerate(header):
                if name in header[:i]:
                    raise DataError(f"{path}: line {start}: the header names column {name!r} twice "
                                    f"(columns {header.index(name) + 1} and {i + 1}); column names must "
                                    "be unique")
            continue
        if len(cells) != len(header):
            hint = ("quote cells that contain commas" if len(cells) > len(header) else
                    "every row needs a cell for each column (an empty cell is still a cell), and cells "
                    "that contain commas or line breaks must be quoted")
            raise DataError(f"{path}: line {start} has {len(cells)} cells, the header has {len(header)} "
                            f"({_short(', '.join(header))}); {hint}")
        row: dict[str, Any] = dict(zip(header, cells))
        row["__where__"] = f"line {start}"
        rows.append(row)
    return rows


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_nan(value: Any) -> bool:
    return (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, decimal.Decimal) and value.is_nan())


def _is_chat(value: Any) -> bool:
    """A list of chat messages: {role, content} (OpenAI style) or {from, value} (ShareGPT style)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value))


def _cell_text(value: Any, where: str, what: str) -> str | None:
    """Text of a reference or id cell; None when the cell is missing (null, NaN or blank).

    Integers and integral floats read as integers (``18``, also for parquet's ``18.0``), other
    floats in their shortest form (``0.75``), booleans as ``true``/``false``. ``what`` names the
    field in errors ("reference field 'answer'"); ±Infinity, lists, objects and bytes are errors.
    """
    if value is None or _is_nan(value):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            raise DataError(f"{where}: {what} is {value} (JSON Infinity), not a usable value; write it as "
                            "text, or null for none")
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, decimal.Decimal):
        if value.is_infinite():
            raise DataError(f"{where}: {what} is {value}, not a usable value; write it as text, or null for none")
        return str(value)
    if isinstance(value, (list, tuple, dict, bytes, bytearray)):
        raise DataError(f"{where}: {what} holds a {type(value).__name__} ({_short(value)}), not one text or "
                        "number; give one value per row (several values per row are not supported)")
    return str(value)  # dates and times from parquet read as their ISO text


def _template_fields(template: str) -> list[str]:
    """Row fields a template reads: ``{a}``, ``{a[b]}`` and ``{a.b}`` all read field ``a``."""
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in string.Formatter().parse(template) if name]


#: How ``make_prompts`` decides splits; recorded in ``corpus/prompts/_COMPLETE`` (``split_rule``). A
#: corpus whose record has none was split by prompt id (an earlier rule).
SPLIT_RULE = "messages-or-group-sha256"


def split_key(messages: list[dict], group: str | None = None) -> str:
    """What decides a prompt's split (``split_of``'s key): ``group:<value>`` when the row has a
    ``data.group_field`` value, else ``messages:`` + the SHA-256 of its normalized messages (roles and
    contents; contents NFC-normalized, lowercased, whitespace collapsed), so the same prompt under two
    ids, or spaced or cased differently, lands in one split. ``messages``: the row's history before
    the task's system prompt is added (a system message of its own counts)."""
    if group is not None:
        return f"group:{group}"
    norm = [[m["role"], " ".join(unicodedata.normalize("NFC", m["content"]).lower().split())] for m in messages]
    return "messages:" + hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


def split_of(key: str, seed: int, validation: float, test: float) -> str:
    """Stable split of one prompt: a hash of (seed, ``key``) mapped to [0, 1). ``key``: ``split_key``
    of the row (any text: the same key always gets the same split)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


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


def make_prompts(records: list[dict], data: DataConfig, task_prompts: TaskPromptsConfig | None,
                 source: str) -> pa.Table:
    """Turn a batch of raw records into prompt rows (``PROMPTS_SCHEMA``, one per record, in order).

    Pure and picklable: the per-batch step of the streaming job (Ray Data ``map_batches`` over
    ``batch.to_pylist()``) and the core of ``load_prompts``. Values may be plain Python or
    numpy/pyarrow scalars and arrays (as Ray Data batches give them); they are read alike.

    Per record: the messages come from ``data.messages_field`` (a chat history, see
    ``DataConfig.messages_field``), else one user message from ``data.prompt_template`` or
    ``data.prompt_field``. The first message is the row's system prompt: ``data.system_prompt``
    when set, else its task's prompt from ``task_prompts`` (``{marker}``/``{max_words}`` filled;
    none when ``task_prompts`` is None or disabled); a history that starts with its own system
    message keeps it and gets neither. ``reference`` from ``data.reference_field`` (null, NaN or
    blank = None); ``task`` from ``data.task_field`` or ``data.task``; ``prompt_id`` from
    ``data.id_field``, else the first 16 hex digits of the SHA-256 of the prompt text (of the
    history's JSON for a conversation; a history of one user message hashes like that text);
    ``split`` by ``split_of`` of ``split_key``: the value of ``data.group_field`` when set and not
    blank (a group's rows share a split), else the normalized messages (the same prompt under
    several ids shares a split), never the id.

    Where errors point: a record's ``__where__`` ("line 12", "row 3") after ``source`` (the file;
    a record's ``__source__``, when present, replaces it); without ``__where__``, ``source`` and
    the row's id ("row id 'a1'"), or its position in the batch when it has no id.

    Raises DataError for: a missing prompt / messages / reference / task field; a prompt that is
    not text (null, NaN, a number, a list; chat messages in a prompt column point to
    ``data.messages_field``); a template naming an absent or empty field; a history that is not a
    non-empty list of messages with a known role and text content, that has a system message
    other than first, or that ends with an assistant turn; a reference, id or group that is
    ±Infinity or a list/object; a missing ``data.group_field`` column; an unknown or empty task
    type; duplicate prompt ids within ``records``.
    """
    if data.prompt_template and not data.messages_field:
        try:
            fields = _template_fields(data.prompt_template)
        except ValueError as e:
            raise DataError(f"data.prompt_template {data.prompt_template!r} is not a valid template: {e}") from None
    else:
        fields = [data.prompt_field]
    named_by = "data.prompt_template" if data.prompt_template else "data.prompt_field"
    system_prompts = task_prompts.system_prompts() if task_prompts is not None else {}

    out: dict[str, list] = {f.name: [] for f in PROMPTS_SCHEMA}
    seen: dict[str, str] = {}
    for i, raw in enumerate(records):
        rec = {k: _plain(v) for k, v in raw.items()}
        where, here = _where(rec, i, source, data.id_field)

        if data.messages_field:
            if data.messages_field not in rec:
                raise DataError(f"{where}: field {data.messages_field!r} (named by data.messages_field) is missing; "
                                f"row has {_columns(rec)}")
            history = _history(rec[data.messages_field], where, data.messages_field)
            if len(history) == 1:  # one user turn: the id of the same text in a prompt column
                hashed = history[0]["content"]
            else:
                hashed = json.dumps(history, ensure_ascii=False, separators=(",", ":"))
        else:
            for field in fields:
                if field not in rec:
                    hint = ("; for literal braces in a template write {{ and }}"
                            if data.prompt_template and not field.isidentifier() else "")
                    chats = [k for k, v in rec.items() if _is_chat(v)]
                    if chats:
                        hint += f"; field {chats[0]!r} holds chat messages: {_use_messages_field(chats[0])}"
                    raise DataError(f"{where}: field {field!r} (named by {named_by}) is missing; "
                                    f"row has {_columns(rec)}{hint}")
                _check_prompt_value(rec[field], where, field, named_by, data.prompt_template is not None)
            if data.prompt_template:
                try:
                    prompt = data.prompt_template.format_map(rec)
                except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
                    raise DataError(f"{where}: data.prompt_template cannot be filled: {e}") from None
            else:
                prompt = rec[data.prompt_field]
            if not prompt.strip():
                raise DataError(f"{where}: the prompt made by {named_by} is empty")
            history = [{"role": "user", "content": prompt}]
            hashed = prompt

        reference = None
        if data.reference_field:
            if data.reference_field not in rec:
                raise DataError(f"{where}: reference field {data.reference_field!r} is missing "
                                "(set data.reference_field=null if the data has no references)")
            # null, NaN (JSON's bare NaN, pandas' missing value) and blank cells are no reference:
            # nothing to score against, rather than the text "nan".
            reference = _cell_text(rec[data.reference_field], where, f"reference field {data.reference_field!r}")

        task = data.task
        if data.task_field:
            if data.task_field not in rec:
                raise DataError(f"{where}: task field {data.task_field!r} (data.task_field) is missing; to give "
                                f"every row one task type, set data.task_field=null and data.task "
                                f"(now {data.task!r}; one of {', '.join(TASKS)})")
            task = rec[data.task_field]
            if task is None or _is_nan(task) or (isinstance(task, str) and not task.strip()):
                raise DataError(f"{where}: task field {data.task_field!r} is empty ({task!r}); "
                                f"known task types: {', '.join(TASKS)}")
        if not isinstance(task, str) or task not in TASKS:
            raise DataError(f"{where}: unknown task type {task!r}; known: {', '.join(TASKS)}")

        pid = _cell_text(rec.get(data.id_field), where, f"id field {data.id_field!r}") if data.id_field else None
        given = pid is not None
        if pid is None:
            pid = hashlib.sha256(hashed.encode()).hexdigest()[:16]
        if pid in seen:
            what = "history" if data.messages_field else "prompt text"
            raise DataError(f"{where}: duplicate prompt id {pid!r} (first seen at {seen[pid]})"
                            + ("" if given else f"; ids without an id value are hashed from the {what}, so "
                               f"this {what} repeats"))
        seen[pid] = here

        group = None
        if data.group_field:
            if data.group_field not in rec:
                raise DataError(f"{where}: group field {data.group_field!r} (named by data.group_field) is missing; "
                                f"row has {_columns(rec)}")
            group = _cell_text(rec[data.group_field], where, f"group field {data.group_field!r}")

        system = data.system_prompt or system_prompts.get(task)
        messages = list(history)
        if system and history[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        out["prompt_id"].append(pid)
        out["split"].append(split_of(split_key(history, group), data.seed, data.split.validation, data.split.test))
        out["task"].append(task)
        out["messages"].append(messages)
        out["reference"].append(reference)
    return pa.Table.from_pydict(out, schema=PROMPTS_SCHEMA)


_MARKERS = ("__where__", "__source__")  # bookkeeping keys a reader adds to a record, not data columns

#: Roles of a chat history, with ShareGPT's names mapped to OpenAI's.
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def _columns(rec: dict[str, Any]) -> list[str]:
    return sorted(k for k in rec if k not in _MARKERS)


def _use_messages_field(field: str) -> str:
    return (f"to send a chat history (the teacher writes the next assistant turn), set "
            f"data.messages_field={field} instead of a prompt column or template")


def _where(rec: dict[str, Any], i: int, source: str, id_field: str | None) -> tuple[str, str]:
    """(the error prefix of a record, what a later duplicate says about it)."""
    src = str(rec.get("__source__") or source)
    label = str(rec.get("__where__") or f"batch row {i + 1}")
    here = label if src == source else f"{src}: {label}"
    if rec.get("__where__"):
        return f"{src}: {label}", here
    pid = None
    if id_field:
        try:
            pid = _cell_text(rec.get(id_field), "", "")
        except DataError:
            pid = None  # a bad id is reported, with this row's position, by the id check
    if pid is not None:
        return f"{src}: row id {pid!r}", here
    return f"{src}: {label} (no id)", here


def _plain(value: Any) -> Any:
    """``value`` as plain Python: numpy arrays and scalars and pyarrow scalars converted, deeply."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    as_py = getattr(value, "as_py", None)  # a pyarrow scalar
    if callable(as_py):
        return _plain(as_py())
    tolist = getattr(value, "tolist", None)  # a numpy array or scalar (np.str_, np.float64, np.bool_)
    if callable(tolist):
        return _plain(tolist())
    return value


def _history(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """The chat history in ``value`` as [{role, content}] with OpenAI roles; DataError naming the
    row, the field and the message (1-based) otherwise."""
    named = f"field {field!r} (named by data.messages_field)"
    if isinstance(value, str) and value.strip().startswith("["):  # a CSV cell of JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {named} is text that is not a JSON list of messages: {e.msg} "
                            f"(column {e.colno})") from None
    if not isinstance(value, list):
        shown = "null" if value is None else "NaN" if _is_nan(value) else _short(value)
        raise DataError(f"{where}: {named} is not a list of chat messages: {shown} ({type(value).__name__}); "
                        "give a list of {role, content} (or ShareGPT {from, value}) objects")
    if not value:
        raise DataError(f"{where}: {named} is an empty list; a conversation needs at least one user message")
    out = []
    for j, m in enumerate(value, 1):
        at = f"{where}: {named}, message {j}"
        if not isinstance(m, dict):
            raise DataError(f"{at} is not an object: {_short(m)} ({type(m).__name__}); give {{role, content}} "
                            "(or ShareGPT {from, value})")
        # Ray Data unifies the keys of a column's structs: a missing key reads as None.
        if m.get("role") is not None or m.get("from") is None:
            role, content, keys = m.get("role"), m.get("content"), ("role", "content")
        else:
            role, content, keys = m.get("from"), m.get("value"), ("from", "value")
        if role is None:
            raise DataError(f"{at} has no role: {_short(m)}; give {{role, content}} (or ShareGPT {{from, value}})")
        mapped = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if mapped is None:
            raise DataError(f"{at} has unknown role {role!r}; known: system, user, assistant "
                            "(ShareGPT: human, gpt, system)")
        if content is None or _is_nan(content):
            raise DataError(f"{at} ({role}) has no {keys[1]}: {_short(m)}")
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}): {keys[1]} is not text: {_short(content)} ({type(content).__name__})")
        if not content.strip():
            raise DataError(f"{at} ({role}): {keys[1]} is empty ({content!r})")
        if mapped == "system" and j > 1:
            raise DataError(f"{at} is a system message; only the first message may be one")
        out.append({"role": mapped, "content": content})
    if out[-1]["role"] == "assistant":
        raise DataError(f"{where}: {named} ends with an assistant turn (message {len(out)}): nothing for the "
                        "teacher to answer; end the history with the user turn to be answered")
    if out[-1]["role"] == "system":
        raise DataError(f"{where}: {named} holds only a system message; add the user turn to be answered")
    return out


def _check_prompt_value(value: Any, where: str, field: str, named_by: str, templated: bool) -> None:
    """Raise DataError unless ``value`` can make (or fill) a prompt; names the row and field."""
    if _is_chat(value):
        raise DataError(f"{where}: field {field!r} (named by {named_by}) holds chat messages "
                        f"({_short(value)}); {_use_messages_field(field)}")
    if value is None or _is_nan(value) or (isinstance(value, str) and not value.strip()):
        shown = "null" if value is None else "NaN" if _is_nan(value) else repr(value)
        if templated:
            raise DataError(f"{where}: field {field!r} used by data.prompt_template is empty ({shown})")
        raise DataError(f"{where}: field {field!r} (named by data.prompt_field) is empty ({shown}); "
                        "every row needs a prompt")
    if templated:
        return  # numbers, and objects read by {a[b]}, fill a template
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} (named by data.prompt_field) is not text: "
                        f"{_short(value)} ({type(value).__name__}); a prompt must be a string")


def task_quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """How many of ``n`` sampled prompts each task gets, given its prompt count: ``n × its share``,
    at least one per task when ``n`` ≥ the number of tasks, then largest remainders first (ties
    by task name, so the result is deterministic). ``n`` ≥ the total keeps every prompt."""
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    exact = {t: n * c / total for t, c in counts.items()}
    floor = 1 if n >= len(counts) else 0  # every task represented while n allows
    quota = {t: max(floor, int(q)) for t, q in exact.items()}
    while sum(quota.values()) > n:  # the floors overshot: take from the task furthest above its share
        t = max((t for t in quota if quota[t] > floor), key=lambda t: (quota[t] - exact[t], t))
        quota[t] -= 1
    for t in sorted(exact, key=lambda t: (-(exact[t] - quota[t]), t)):
        if sum(quota.values()) >= n:
            break
        quota[t] += 1
    return quota


def sample_by_task(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A seeded sample of ``n`` rows of a prompt table, spread over its task types in proportion.

    Each task gets its ``task_quotas`` share; rows within a task are chosen by a hash of (seed,
    prompt id), so the sample is stable across runs and machines. The original row order is kept.
    ``n`` ≥ the row count returns the table unchanged. (The generate stage computes the same
    sample in Ray Data.)
    """
    if n >= table.num_rows:
        return table
    ids = table.column("prompt_id").to_pylist()
    tasks = table.column("task").to_pylist()
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    quota = task_quotas({t: len(rows) for t, rows in by_task.items()}, n)
    keep: list[int] = []
    for t, rows in by_task.items():
        rank = sorted(rows, key=lambda i: hashlib.sha256(f"{seed}:sample:{ids[i]}".encode()).digest())
        keep += rank[: quota[t]]
    return table.take(sorted(keep))


def select_split(table: pa.Table, splits: tuple[str, ...]) -> pa.Table:
    """Rows of ``table`` whose ``split`` is in ``splits``."""
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))
