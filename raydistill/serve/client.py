"""The client of an OpenAI-compatible chat endpoint, as ``raydistill bench-serve``
(``serve.bench``) and ``raydistill evaluate`` with ``eval.latency_source: serve`` use it: where the
endpoint is (``endpoint_url``), its key (``api_key``), checks that it serves the models a config
needs (``check_endpoint``, ``check_served_models``), and streamed, timed chat completions
(``stream_chat``, ``run_requests``). It computes no benchmark figures (``serve.bench`` does) and
never starts or stops a server.

The endpoint is the one ``raydistill serve`` runs: the OpenAI API on
``http://{serve.host}:{serve.port}/v1`` with the models ``teacher`` and ``student`` (any
OpenAI-compatible server that serves those two names will do, e.g. vLLM's own with
``--served-model-name teacher student``).

One request (``stream_chat``): ``POST /v1/chat/completions`` with ``stream: true`` and
``stream_options: {include_usage: true}``, temperature 0 in the benchmark. Per request:

- ``latency_s``: request sent → the stream's ``data: [DONE]`` line, seconds (the stream is then
  read to its end, so the server never sees a client leave early);
- ``ttft_s``: request sent → first chunk whose delta carries non-empty text (the first token a
  user sees), seconds; None for an answer with no text;
- ``output_tokens`` / ``prompt_tokens``: the ``usage`` of the final chunk (None when the server
  sent none: such a request counts in latency but not in tokens/s);
- ``answered_by``: the arm named by the response: its header ``x-raydistill-arm`` (the contract of
  ``raydistill serve``; a request whose header names another arm than the one asked counts as an
  error), else the chunks' ``model`` (recorded only: a server that serves one model under several
  names, as vLLM's own does, may answer with its first name);
- ``error``: None, or the HTTP status and the server's message, a timeout, a refused connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

from ..config import Config
from ..openai_errors import server_message
from . import ARM_HEADER, ARMS

#: Seconds before one request is abandoned (counted as an error).
REQUEST_TIMEOUT_S = 600.0
#: Most characters of the server's message kept in an error.
MESSAGE_CHARS = 300


class EndpointError(ConnectionError):
    """Nothing answers on the endpoint, or it does not serve the models the benchmark needs (an
    OSError, so the CLI prints its message like any unreachable storage)."""


# ----------------------------------------------------------------------------- the endpoint

def endpoint_url(cfg: Config) -> str:
    """``http://{serve.host}:{serve.port}/v1``; a wildcard bind address (0.0.0.0, ::) is reached on
    127.0.0.1."""
    host = cfg.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.port}/v1"


def api_key(cfg: Config) -> str | None:
    """The key clients send (``Authorization: Bearer``): the value of the environment variable named
    by ``serve.api_key_env``, None when that is null. Raises EndpointError when the variable is unset
    or empty (before any request)."""
    name = cfg.serve.api_key_env
    if not name:
        return None
    value = os.environ.get(name, "").strip()
    if not value:
        raise EndpointError(f"serve.api_key_env: environment variable {name} is not set (or empty); export the "
                            f"endpoint's key (export {name}=...) before running against it")
    return value


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get_models(base_url: str, key: str | None, timeout_s: float) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{base_url}/models", headers=_auth(key))
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def check_endpoint(base_url: str, arms: tuple[str, ...] = ARMS, timeout_s: float = 10.0,
                   key: str | None = None) -> list[str]:
    """The model ids the endpoint lists (``GET {base_url}/models``, with ``key`` as Bearer key).

    Raises EndpointError when nothing answers ("start `raydistill serve CONFIG` first"), when the
    endpoint refuses the key (401: serve.api_key_env), when the answer is not an OpenAI model list,
    or when one of ``arms`` is not served (the served ids are named)."""
    import urllib.error

    try:
        body = _get_models(base_url, key, timeout_s)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise EndpointError(f"the endpoint {base_url} refused the request (HTTP {e.code}: "
                                f"{server_message(e.read(), MESSAGE_CHARS)}): set serve.api_key_env to the variable holding "
                                "the endpoint's key" + (" (no key was sent)" if not key else "")) from None
        raise EndpointError(f"the endpoint {base_url} answered GET /models with HTTP {e.code}: is it the "
                            "OpenAI API of `raydistill serve`?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EndpointError(f"nothing answers on {base_url} ({reason}): start `raydistill serve CONFIG` first "
                            "(serve.host and serve.port say where the benchmark looks)") from None
    except ValueError as e:
        raise EndpointError(f"the endpoint {base_url} answered GET /models with something other than JSON "
                            f"({e})") from None
    ids = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
    missing = [a for a in arms if a not in ids]
    if missing:
        raise EndpointError(f"the endpoint {base_url} does not serve {', '.join(missing)} (it serves: "
                            f"{', '.join(map(str, ids)) or 'nothing'}); start `raydistill serve CONFIG`")
    return ids


def check_served_models(cfg: Config, base_url: str, timeout_s: float = 10.0) -> dict[str, str | None]:
    """What each arm of the endpoint serves: ``metadata.fingerprint`` of its card in ``GET
    {base_url}/models`` (``raydistill serve`` puts ``serve.app.model_fingerprint`` of each arm's
    model there, never its storage location; None when the server does not say, e.g. vLLM's own
    server). Sends ``api_key(cfg)``.

    Raises EndpointError when an arm's fingerprint differs from that of the model ``cfg`` would
    serve (student: ``serve.student.model`` or ``<output_dir>/student``; teacher:
    ``serve.teacher.model`` or ``teacher.model``; ``serve.app.arm_fingerprints``): figures of other
    models must not be reported as this run's."""
    from .app import arm_fingerprints, arm_refs

    body = _get_models(base_url, api_key(cfg), timeout_s)
    cards = {m.get("id"): m for m in body.get("data", []) if isinstance(m, dict)}
    served = {arm: ((cards.get(arm) or {}).get("metadata") or {}).get("fingerprint") for arm in ARMS}
    if all(v is None for v in served.values()):
        return served
    expected, refs = arm_fingerprints(cfg), arm_refs(cfg)
    wrong = [f"{arm}: serves a model with fingerprint {served[arm]}, this config's {refs[arm]} has {expected[arm]}"
             for arm in ARMS if served[arm] is not None and served[arm] != expected[arm]]
    if wrong:
        raise EndpointError(f"the endpoint {base_url} serves other models than this config ({'; '.join(wrong)}): "
                            "start `raydistill serve` with this config (same output_dir and serve.*.model)")
    return served


# ----------------------------------------------------------------------------- the client

@dataclass
class RequestRecord:
    """One streamed chat completion (see the module docstring for each field; times in seconds)."""

    arm: str
    index: int
    start_s: float
    latency_s: float | None = None
    ttft_s: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    answered_by: str | None = None
    text: str = ""
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def stream_chat(session, base_url: str, arm: str, messages: list[dict], sampling: dict,
                      index: int = 0, timeout_s: float = REQUEST_TIMEOUT_S) -> RequestRecord:
    """Send one streaming chat completion for model ``arm`` and time it.

    Args:
        session: an ``aiohttp.ClientSession``.
        messages: OpenAI chat messages (``[{"role", "content"}]``).
        sampling: request fields besides model/messages/stream (``max_tokens``, ``temperature``, ...).
    Returns:
        A RequestRecord; failures (HTTP status ≥ 400, a broken stream, a timeout, another arm
        answering) are recorded in ``error``, never raised.
    """
    import aiohttp

    payload = {"model": arm, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
               **sampling}
    rec = RequestRecord(arm=arm, index=index, start_s=time.perf_counter())
    named = None
    t0 = rec.start_s
    parts: list[str] = []
    done: float | None = None
    try:
        async with session.post(f"{base_url}/chat/completions", json=payload,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            rec.status = resp.status
            if resp.status >= 400:
                rec.error = f"HTTP {resp.status}: {server_message(await resp.read(), MESSAGE_CHARS)}"
                return rec
            named = rec.answered_by = resp.headers.get(ARM_HEADER)
            async for raw in resp.content:  # read to the end: leaving early makes the server cancel
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:") or done is not None:
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = time.perf_counter()
                    continue
                chunk = json.loads(data)
                if "error" in chunk:  # an error after the stream started
                    rec.error = f"stream error: {server_message(data, MESSAGE_CHARS)}"
                    break
                if rec.answered_by is None and chunk.get("model"):
                    rec.answered_by = chunk["model"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        if rec.ttft_s is None:
                            rec.ttft_s = time.perf_counter() - t0
                        parts.append(text)
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    rec.output_tokens = usage.get("completion_tokens")
                    rec.prompt_tokens = usage.get("prompt_tokens")
            if rec.error is None and done is None:
                rec.error = "the stream ended without data: [DONE]"
    except asyncio.TimeoutError:
        rec.error = f"no complete answer within {timeout_s:.0f} s"
    except aiohttp.ClientError as e:
        rec.error = f"{type(e).__name__}: {e}"
    except ValueError as e:  # a chunk that is not JSON
        rec.error = f"unreadable stream chunk: {e}"
    rec.text = "".join(parts)
    if rec.error is None:
        rec.latency_s = done - t0
        if named is not None and named != arm:
            rec.error = f"asked for {arm!r} but the response's {ARM_HEADER} header names {named!r}"
            rec.latency_s = None
    return rec


async def _drive(base_url: str, arm: str, prompts: list[list[dict]], concurrency: int, sampling: dict,
                 timeout_s: float, first_index: int, key: str | None = None) -> tuple[list[RequestRecord], float]:
    import aiohttp

    queue: list[tuple[int, list[dict]]] = list(enumerate(prompts, start=first_index))
    queue.reverse()
    records: list[RequestRecord] = []
    connector = aiohttp.TCPConnector(limit=max(1, concurrency))
    async with aiohttp.ClientSession(connector=connector, headers=_auth(key)) as session:
        async def client() -> None:
            while queue:
                i, messages = queue.pop()
                records.append(await stream_chat(session, base_url, arm, messages, sampling, i, timeout_s))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(prompts))))))
        wall = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return records, wall


def run_requests(base_url: str, arm: str, prompts: list[list[dict]], concurrency: int, sampling: dict,
                 timeout_s: float = REQUEST_TIMEOUT_S, first_index: int = 0,
                 key: str | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``prompts`` (one list of chat messages each) to model ``arm`` with ``concurrency``
    clients, each sending its next request when its last one is answered; ``key`` (``api_key``)
    goes in every request's ``Authorization: Bearer`` header.

    Returns (records in prompt order, wall seconds from the first request sent to the last answer).
    Record ``index`` = ``first_index`` + the prompt's position. Failed requests are records with
    ``error`` set."""
    return asyncio.run(_drive(base_url, arm, prompts, concurrency, sampling, timeout_s, first_index, key))
