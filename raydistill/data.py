"""Read prompt files, build chat messages, and split prompts stably.

Supported formats: ``.jsonl`` (one object per line), ``.json`` (a list of objects),
``.parquet`` and ``.csv`` (header row). Every error names the file and the line/row and field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import string
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import DEMO_DATA, TASKS, DataConfig
from .schema import PROMPTS_SCHEMA

FORMATS = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Bad prompt data; the message names the file and the row (1-based) or field."""


def resolve_data_path(path: str) -> Path:
    """The file behind ``data.path`` (``builtin:demo`` is the packaged demo set)."""
    if path == DEMO_DATA:
        return Path(__file__).parent / "demo" / "prompts.jsonl"
    return Path(path).expanduser()


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name.
    return path.open(encoding="utf-8-sig", newline="" if path.suffix.lower() == ".csv" else None)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read every row of a prompt file as a dict.

    Each dict carries ``__where__``: "line N" (.jsonl and .csv: the file line, 1-based),
    "item N" (.json) or "row N" (.parquet), used in error messages. Raises DataError naming the
    file and the line/row for unreadable files, bad encodings, malformed JSON and non-objects.
    """
    if path.is_dir():
        raise DataError(f"data path {path} is a folder; give a file ({', '.join(FORMATS)})")
    if not path.exists():
        if str(path).startswith(("s3:/", "gs:/", "http:/", "https:/")):
            raise DataError(f"{path}: remote prompt files are not supported yet; copy the file locally")
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(FORMATS)}")
    try:
        return _read(path, suffix)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None


def _read(path: Path, suffix: str) -> list[dict[str, Any]]:
    if suffix == ".jsonl":
        rows = []
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                obj["__where__"] = f"line {lineno}"
                rows.append(obj)
        return rows
    if suffix == ".json":
        with _open_text(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects at top level, got {type(data).__name__}")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: item {i + 1}: expected a JSON object, got {type(obj).__name__}")
            obj["__where__"] = f"item {i + 1}"
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet: {e}") from None
        for i, row in enumerate(rows):
            row["__where__"] = f"row {i + 1}"
        return rows
    csv.field_size_limit(2**31 - 1)  # long documents are legitimate prompts
    rows = []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            row["__where__"] = f"line {reader.line_num}"
            rows.append(row)
    return rows


def _template_fields(template: str) -> list[str]:
    """Row fields a template reads: ``{a}``, ``{a[b]}`` and ``{a.b}`` all read field ``a``."""
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in string.Formatter().parse(template) if name]


def split_of(prompt_id: str, seed: int, validation: float, test: float) -> str:
    """Stable split of one prompt: a hash of (seed, prompt id) mapped to [0, 1)."""
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def load_prompts(cfg: DataConfig) -> pa.Table:
    """Read, check, and split the prompt file into a table with ``PROMPTS_SCHEMA``.

    Raises DataError for: a missing or unreadable file, an empty dataset, a missing prompt /
    reference / task column (naming the first row without it), a template naming an absent
    field, an unknown task type, and duplicate prompt ids.
    """
    path = resolve_data_path(cfg.path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if cfg.prompt_template:
        try:
            fields = _template_fields(cfg.prompt_template)
        except ValueError as e:
            raise DataError(f"data.prompt_template {cfg.prompt_template!r} is not a valid template: {e}") from None
    else:
        fields = [cfg.prompt_field]

    out: dict[str, list] = {f.name: [] for f in PROMPTS_SCHEMA}
    seen: dict[str, str] = {}
    for rec in records:
        where = f"{path}: {rec['__where__']}"
        for field in fields:
            if field not in rec:
                what = "data.prompt_template" if cfg.prompt_template else "data.prompt_field"
                hint = ("; for literal braces in a template write {{ and }}"
                        if cfg.prompt_template and not field.isidentifier() else "")
                raise DataError(f"{where}: field {field!r} (named by {what}) is missing; "
                                f"row has {sorted(k for k in rec if k != '__where__')}{hint}")
            value = rec[field]
            if cfg.prompt_template and (value is None or (isinstance(value, str) and not value.strip())):
                raise DataError(f"{where}: field {field!r} used by data.prompt_template is empty")
        if cfg.prompt_template:
            try:
                prompt = cfg.prompt_template.format_map({k: v for k, v in rec.items()})
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(f"{where}: data.prompt_template cannot be filled: {e}") from None
        else:
            prompt = rec[cfg.prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: the prompt is empty or not text ({prompt!r})")

        reference = None
        if cfg.reference_field:
            if cfg.reference_field not in rec:
                raise DataError(f"{where}: reference field {cfg.reference_field!r} is missing "
                                "(set data.reference_field=null if the data has no references)")
            ref = rec[cfg.reference_field]
            # An empty cell is a missing reference, not an answer to score against.
            reference = None if ref is None or not str(ref).strip() else str(ref)

        task = cfg.task
        if cfg.task_field:
            if cfg.task_field not in rec:
                raise DataError(f"{where}: task field {cfg.task_field!r} is missing")
            task = rec[cfg.task_field]
        if task not in TASKS:
            raise DataError(f"{where}: unknown task type {task!r}; known: {', '.join(TASKS)}")

        if cfg.id_field and rec.get(cfg.id_field) not in (None, ""):
            pid = str(rec[cfg.id_field])
        else:
            pid = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        if pid in seen:
            raise DataError(f"{where}: duplicate prompt id {pid!r} (first seen at {seen[pid]})"
                            + ("" if cfg.id_field and cfg.id_field in rec else "; ids without an id column "
                               "are hashed from the prompt text, so this prompt text repeats"))
        seen[pid] = rec["__where__"]

        messages = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": prompt})
        out["prompt_id"].append(pid)
        out["split"].append(split_of(pid, cfg.seed, cfg.split.validation, cfg.split.test))
        out["task"].append(task)
        out["messages"].append(messages)
        out["reference"].append(reference)
    return pa.Table.from_pydict(out, schema=PROMPTS_SCHEMA)


def sample_by_task(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A seeded sample of ``n`` rows of a prompt table, spread over its task types in proportion.

    Each task gets ``n × its share`` rows (largest remainders first; at least one per task when
    ``n`` ≥ the number of tasks); rows within a task are chosen by a hash of (seed, prompt id), so the sample is
    stable across runs and machines. The original row order is kept. ``n`` ≥ the row count
    returns the table unchanged.
    """
    if n >= table.num_rows:
        return table
    ids = table.column("prompt_id").to_pylist()
    tasks = table.column("task").to_pylist()
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    exact = {t: n * len(rows) / len(ids) for t, rows in by_task.items()}
    floor = 1 if n >= len(by_task) else 0  # every task represented while n allows
    quota = {t: max(floor, int(q)) for t, q in exact.items()}
    while sum(quota.values()) > n:  # the floors overshot: take from the task furthest above its share
        t = max((t for t in quota if quota[t] > floor), key=lambda t: (quota[t] - exact[t], t))
        quota[t] -= 1
    # Then largest remainders first; ties broken by task name so the result is deterministic.
    for t in sorted(exact, key=lambda t: (-(exact[t] - quota[t]), t)):
        if sum(quota.values()) >= n:
            break
        quota[t] += 1
    keep: list[int] = []
    for t, rows in by_task.items():
        rank = sorted(rows, key=lambda i: hashlib.sha256(f"{seed}:sample:{ids[i]}".encode()).digest())
        keep += rank[: quota[t]]
    return table.take(sorted(keep))


def select_split(table: pa.Table, splits: tuple[str, ...]) -> pa.Table:
    """Rows of ``table`` whose ``split`` is in ``splits``."""
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))
