"""The message of an error answer from an OpenAI-compatible server, for the clients that talk to
one: the ``openai`` teacher engine (``generate.openai_engine``) and the endpoint client
(``serve.client``). Any stage may import it (it imports nothing of raydistill); it sends no
requests and makes no error answers (``serve.ingress`` does, in OpenAI's shape).
"""

from __future__ import annotations

import json

#: Most characters of a server's message kept in an error (a longer one is cut and ends with "…").
MAX_ERROR_CHARS = 500


def server_message(body: str | bytes, limit: int = MAX_ERROR_CHARS) -> str:
    """The message of an error body, whitespace collapsed to single spaces, cut to ``limit``
    characters (then ending with "…").

    Shapes read, first match wins: OpenAI's ``{"error": {"message": ...}}``; ``{"error": "..."}``;
    vLLM's ``{"object": "error", "message": ...}`` (any ``{"message": ...}``); FastAPI's
    ``{"detail": ...}``; an ``error`` object without a message is shown whole (as JSON). Anything
    else (not JSON, an HTML page, JSON that is not an object, an object without those keys): the
    body itself. ``bytes`` are read as UTF-8 (undecodable bytes replaced)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            msg = err.get("message") or json.dumps(err)
        else:
            msg = err if isinstance(err, str) and err else data.get("message") or data.get("detail")
        if msg:
            text = str(msg)
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")
