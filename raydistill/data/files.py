"""Prompt files to records: the formats (.jsonl, .json, .parquet, .csv), the local file behind
``data.path``, and the checks a file gets before any row is used (UTF-8, lone surrogates, CSV cell
counts, parquet columns of pickled objects).

A record is a dict of the file's columns plus ``__where__`` (its line or row, for errors); turning
records into prompt rows is ``rows``'.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import DEMO_DATA, REMOTE_PATH
from .values import DataError, short

FORMATS = (".jsonl", ".json", ".parquet", ".csv")


def resolve_data_path(path: str) -> Path:
    """The local file behind ``data.path``.

    ``builtin:demo`` is the packaged demo set; ``~`` expands; a relative path is relative to the
    current directory (not to the config file's folder). Raises DataError for a remote path
    (``s3://…``, printed as given) and for a missing file, saying what a relative path resolved to.
    """
    if path == DEMO_DATA:
        return Path(__file__).parent.parent / "demo" / "prompts.jsonl"
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


def parquet_rows(table: pa.Table, name: str, first_row: int | None = 1) -> list[dict[str, Any]]:
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
    rows = parquet_rows(table, str(path))
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
                            f"({short(', '.join(header))}); {hint}")
        row: dict[str, Any] = dict(zip(header, cells))
        row["__where__"] = f"line {start}"
        rows.append(row)
    return rows
