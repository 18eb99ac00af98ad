"""Records to prompt rows (``schema.PROMPTS_SCHEMA``): the messages (a prompt field, a template
or a chat history, after the task's system prompt), the reference, the task, the prompt id and
the split, with errors naming the file, the line and the field (``make_prompts``).

It works on records already read (``files``) and one batch at a time; sampling is ``split``'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from typing import Any

import pyarrow as pa

from ..config import TASKS, DataConfig, TaskPromptsConfig
from ..schema import PROMPTS_SCHEMA
from .split import split_key, split_of
from .values import DataError, cell_text, is_chat, is_nan, plain, short


def _template_fields(template: str) -> list[str]:
    """Row fields a template reads: ``{a}``, ``{a[b]}`` and ``{a.b}`` all read field ``a``."""
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in string.Formatter().parse(template) if name]


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
        rec = {k: plain(v) for k, v in raw.items()}
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
                    chats = [k for k, v in rec.items() if is_chat(v)]
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
            reference = cell_text(rec[data.reference_field], where, f"reference field {data.reference_field!r}")

        task = data.task
        if data.task_field:
            if data.task_field not in rec:
                raise DataError(f"{where}: task field {data.task_field!r} (data.task_field) is missing; to give "
                                f"every row one task type, set data.task_field=null and data.task "
                                f"(now {data.task!r}; one of {', '.join(TASKS)})")
            task = rec[data.task_field]
            if task is None or is_nan(task) or (isinstance(task, str) and not task.strip()):
                raise DataError(f"{where}: task field {data.task_field!r} is empty ({task!r}); "
                                f"known task types: {', '.join(TASKS)}")
        if not isinstance(task, str) or task not in TASKS:
            raise DataError(f"{where}: unknown task type {task!r}; known: {', '.join(TASKS)}")

        pid = cell_text(rec.get(data.id_field), where, f"id field {data.id_field!r}") if data.id_field else None
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
            group = cell_text(rec[data.group_field], where, f"group field {data.group_field!r}")

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
            pid = cell_text(rec.get(id_field), "", "")
        except DataError:
            pid = None  # a bad id is reported, with this row's position, by the id check
    if pid is not None:
        return f"{src}: row id {pid!r}", here
    return f"{src}: {label} (no id)", here


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
        shown = "null" if value is None else "NaN" if is_nan(value) else short(value)
        raise DataError(f"{where}: {named} is not a list of chat messages: {shown} ({type(value).__name__}); "
                        "give a list of {role, content} (or ShareGPT {from, value}) objects")
    if not value:
        raise DataError(f"{where}: {named} is an empty list; a conversation needs at least one user message")
    out = []
    for j, m in enumerate(value, 1):
        at = f"{where}: {named}, message {j}"
        if not isinstance(m, dict):
            raise DataError(f"{at} is not an object: {short(m)} ({type(m).__name__}); give {{role, content}} "
                            "(or ShareGPT {from, value})")
        # Ray Data unifies the keys of a column's structs: a missing key reads as None.
        if m.get("role") is not None or m.get("from") is None:
            role, content, keys = m.get("role"), m.get("content"), ("role", "content")
        else:
            role, content, keys = m.get("from"), m.get("value"), ("from", "value")
        if role is None:
            raise DataError(f"{at} has no role: {short(m)}; give {{role, content}} (or ShareGPT {{from, value}})")
        mapped = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if mapped is None:
            raise DataError(f"{at} has unknown role {role!r}; known: system, user, assistant "
                            "(ShareGPT: human, gpt, system)")
        if content is None or is_nan(content):
            raise DataError(f"{at} ({role}) has no {keys[1]}: {short(m)}")
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}): {keys[1]} is not text: {short(content)} ({type(content).__name__})")
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
    if is_chat(value):
        raise DataError(f"{where}: field {field!r} (named by {named_by}) holds chat messages "
                        f"({short(value)}); {_use_messages_field(field)}")
    if value is None or is_nan(value) or (isinstance(value, str) and not value.strip()):
        shown = "null" if value is None else "NaN" if is_nan(value) else repr(value)
        if templated:
            raise DataError(f"{where}: field {field!r} used by data.prompt_template is empty ({shown})")
        raise DataError(f"{where}: field {field!r} (named by data.prompt_field) is empty ({shown}); "
                        "every row needs a prompt")
    if templated:
        return  # numbers, and objects read by {a[b]}, fill a template
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} (named by data.prompt_field) is not text: "
                        f"{short(value)} ({type(value).__name__}); a prompt must be a string")
