"""The data package's error, and how one cell of a prompt file reads: missing (null, NaN, blank),
text of a reference or id, a chat history or not, plain Python from numpy/pyarrow values.

It reads single values; it neither reads files (``files``) nor builds prompt rows (``rows``).
"""

from __future__ import annotations

import decimal
import math
from typing import Any


class DataError(ValueError):
    """Bad prompt data; the message names the file and the row (1-based) or field."""


def short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_nan(value: Any) -> bool:
    return (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, decimal.Decimal) and value.is_nan())


def is_chat(value: Any) -> bool:
    """A list of chat messages: {role, content} (OpenAI style) or {from, value} (ShareGPT style)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value))


def cell_text(value: Any, where: str, what: str) -> str | None:
    """Text of a reference or id cell; None when the cell is missing (null, NaN or blank).

    Integers and integral floats read as integers (``18``, also for parquet's ``18.0``), other
    floats in their shortest form (``0.75``), booleans as ``true``/``false``. ``what`` names the
    field in errors ("reference field 'answer'"); ±Infinity, lists, objects and bytes are errors.
    """
    if value is None or is_nan(value):
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
        raise DataError(f"{where}: {what} holds a {type(value).__name__} ({short(value)}), not one text or "
                        "number; give one value per row (several values per row are not supported)")
    return str(value)  # dates and times from parquet read as their ISO text


def plain(value: Any) -> Any:
    """``value`` as plain Python: numpy arrays and scalars and pyarrow scalars converted, deeply."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    as_py = getattr(value, "as_py", None)  # a pyarrow scalar
    if callable(as_py):
        return plain(as_py())
    tolist = getattr(value, "tolist", None)  # a numpy array or scalar (np.str_, np.float64, np.bool_)
    if callable(tolist):
        return plain(tolist())
    return value
