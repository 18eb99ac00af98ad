"""docs/config.md, generated from the config's own field descriptions.

``render()`` walks ``raydistill.config.Config`` recursively and returns Markdown: one section per
sub-config (``data``, ``data.split``, ``teacher``, ``teacher.price_per_mtok``, ...) with a table of
dotted key, type, default and description. A field without a description is listed all the same
(description "—"; ``undocumented_keys`` names such fields). ``python -m raydistill.config_doc > docs/config.md`` regenerates the file;
``tests/test_docs.py`` fails when it is stale. It documents the config; it does not validate or
load one (``raydistill.config.load`` does).
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config

COMMAND = "python -m raydistill.config_doc > docs/config.md"

HEADER = f"""# Config reference

<!-- Generated from raydistill/config.py by `{COMMAND}`; do not edit by hand
     (tests/test_docs.py fails when this file is stale). -->

Every key of a run config, generated from the field descriptions in `raydistill/config.py`. A
config is one YAML file; unknown keys and bad values are errors that name the dotted key and the
value. `--set dotted.key=value` overrides any key on the command line. What each section is for,
with examples, is in [usage.md](usage.md); `raydistill/demo/config.yaml` is a complete example.
"""


def sub_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside ``X | None``), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_name(annotation: Any) -> str:
    """A short, readable type: ``int``, ``str | null``, ``'ddp' | 'fsdp'``, ``list[int]``."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in get_args(annotation))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(field) -> Any:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, ensure_ascii=False).replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    """One table cell: one line, with the characters Markdown would read as markup escaped."""
    text = " ".join(text.split())
    for char, escaped in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


def _constraints(field) -> str:
    """Bounds and lengths declared on the field (ge, gt, le, lt, min_length, max_length)."""
    parts = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length", "max_length": "max length"}
    for meta in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _doc(model: type[BaseModel]) -> str | None:
    """The model's own docstring (not an inherited one), as one paragraph."""
    doc = model.__dict__.get("__doc__")
    return " ".join(doc.split()) if doc else None


def _sections(model: type[BaseModel], prefix: str, title: str, out: list[str], undocumented: list[str]) -> None:
    rows, subs = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = sub_model(field.annotation)
        description = field.description or ""
        if sub is None and not description:
            undocumented.append(key)
        if sub is not None:
            subs.append((key, sub, field))
            anchor = key.replace(".", "")
            description = (description + " " if description else "") + f"See [`{key}`](#{anchor})."
        limits = _constraints(field)
        description = _cell(description) or "—"
        if limits:
            description += f" (bounds: {limits})"
        rows.append(f"| `{key}` | {type_name(field.annotation)} | {_default(field)} | {description} |")
    out.append(f"## {title}\n")
    doc = _doc(model)
    if doc:
        out.append(doc.replace("``", "`") + "\n")
    out.append("| key | type | default | description |\n|---|---|---|---|")
    out.extend(rows)
    out.append("")
    for key, sub, _field in subs:
        _sections(sub, f"{key}.", f"`{key}`", out, undocumented)


def render() -> str:
    """docs/config.md: the header, then one section per config section (top-level keys first)."""
    out: list[str] = [HEADER]
    undocumented: list[str] = []
    _sections(Config, "", "Top level", out, undocumented)
    return "\n".join(out).rstrip("\n") + "\n"


def undocumented_keys() -> list[str]:
    """Dotted keys of value fields (not sections) without a description; docs/config.md lists them
    all the same. A section field's own table documents it."""
    keys: list[str] = []
    _sections(Config, "", "Top level", [], keys)
    return keys


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())

