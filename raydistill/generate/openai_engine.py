"""The ``openai`` engine: any OpenAI-compatible chat-completions endpoint (a hosted DeepSeek V3,
Azure, OpenAI, a vLLM server), answered from Ray Data through ``ray.data.llm``'s HTTP processor
(``HttpRequestProcessorConfig`` + ``build_processor``).

What Ray 2.60's HTTP request stage does, read from its source
(``ray/llm/_internal/batch/stages/http_request_stage.py``), and what this module adds:

- It retries 408/429/502/503/504, timeouts and connection errors with ``base × 2^n`` backoff,
  ignores ``Retry-After``, never retries a 500, and after the last retry raises a
  ``RuntimeError`` that fails the whole dataset (its message holds the row's payload). Its
  processor config has no ``should_continue_on_error``. A non-JSON error body also fails the job.
- It has no per-request timeout (aiohttp's default: 300 s per request).
- Its ``qps`` is an int, counted per batch (the clock restarts at every batch, and concurrent
  batches and actors each get the full rate), and it spaces the *creation* of lazily-started
  aiohttp requests, which then go out one after another: a batch waits ``batch/qps`` seconds and
  then bursts. Requests of one batch are never in flight together.

So the processor runs with ``max_retries=0`` and ``qps=None``, and its ``session_factory`` gives
it ``_Session``: a thin stand-in for ``aiohttp.ClientSession`` that starts each request as soon
as the stage creates it (up to ``teacher.concurrency`` in flight, ``teacher.requests_per_s``
spread over time, both split evenly over ``teacher.replicas`` actors), applies
``teacher.timeout_s`` per attempt, retries 408/429/500/502/503/504, timeouts and connection
errors up to ``teacher.max_retries`` times (backoff ``retry_wait_s × 2^n``, or the server's
``Retry-After`` when longer), and hands the stage one flat JSON answer per row: the endpoint's
body on success, or the final status and the server's message, so that a row that fails for
good becomes an error row and the job goes on.

The API key is read on the driver from the environment variable ``teacher.api_key_env`` and
travels to the HTTP actors inside the pickled session factory (Ray's actor constructor
arguments), wrapped in ``_Secret`` whose ``repr`` is ``***``. It is not in the processor's
``headers`` field, not in a ``runtime_env`` (the Ray dashboard shows those), not in any log
line, and it is scrubbed from every error message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from functools import lru_cache, partial
from typing import Any

from ..config import GenerationConfig, TeacherConfig
from ..openai_errors import server_message

log = logging.getLogger(__name__)

from .common import chat_messages

#: Statuses worth another attempt: timeouts, rate limits and transient server errors.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: The longest ``Retry-After`` honoured (s); a longer one waits this long.
MAX_RETRY_AFTER_S = 600.0


class _Secret:
    """A string that never shows itself: ``repr``/``str`` print ``***`` (logs, tracebacks, Ray's
    printed arguments); ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__


def api_key(teacher: TeacherConfig) -> _Secret | None:
    """The API key from the environment variable named by ``teacher.api_key_env``.

    Returns None when ``api_key_env`` is null (a local server that needs no key).
    Raises ValueError naming the variable when it is unset or empty (before any request).
    """
    name = teacher.api_key_env
    if not name:
        return None
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"teacher.api_key_env: environment variable {name} is not set; export it "
                         f"(export {name}=...) in the shell that starts the job, or set "
                         "teacher.api_key_env: null for an endpoint that needs no key")
    return _Secret(value)


def _scrub(text: str, key: _Secret | None) -> str:
    return text.replace(key.reveal(), "***") if key is not None else text


class _Limits:
    """Per-actor limits shared by every batch (session) of one processor in this process:
    a semaphore of ``in_flight`` requests and a start-time schedule of ``rate`` requests/s."""

    _registry: dict[str, "_Limits"] = {}

    def __init__(self, in_flight: int, rate: float | None):
        import asyncio

        self.semaphore = asyncio.Semaphore(in_flight)
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0

    @classmethod
    def get(cls, name: str, in_flight: int, rate: float | None) -> "_Limits":
        if name not in cls._registry:
            cls._registry[name] = cls(in_flight, rate)
        return cls._registry[name]

    async def wait_turn(self) -> None:
        """Sleep until this request may start (evenly spaced starts, no bursts)."""
        import asyncio

        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class _Reply:
    """What ``_Session.post`` resolves to: a response the Ray stage reads (``status`` 200 and
    ``json()``) holding one flat dict per row (see ``_Session._exchange``)."""

    status = 200
    reason = "OK"

    def __init__(self, body: dict):
        self._body = body

    async def json(self) -> dict:
        return self._body

    async def __aenter__(self) -> "_Reply":
        return self

    async def __aexit__(self, *exc) -> None:
        return None


class _Pending:
    """An already-started request; ``await`` gives its ``_Reply``."""

    def __init__(self, task):
        self.task = task

    def __await__(self):
        return self.task.__await__()


class _Session:
    """Stands in for the ``aiohttp.ClientSession`` Ray's HTTP stage opens per batch (its
    ``session_factory``). ``post`` starts the request at once (Ray's stage awaits requests one
    after another) and never raises: every outcome is a ``_Reply`` with ``status`` (the endpoint's
    last HTTP status, 0 when none came), ``body`` (the response text on 200, else ""), ``error``
    (null, or the reason the row failed for good), ``latency_s`` (the answered attempt, seconds),
    ``attempts`` and ``batch_id``."""

    def __init__(self, factory: "_SessionFactory"):
        self.f = factory
        self.batch_id = uuid.uuid4().hex
        self.tasks: list = []
        self.http = None
        self.limits = _Limits.get(factory.name, factory.in_flight, factory.rate)

    async def __aenter__(self) -> "_Session":
        import aiohttp

        headers = {"Authorization": f"Bearer {self.f.key.reveal()}"} if self.f.key is not None else {}
        # Connection pool as large as the in-flight cap (aiohttp's default is 100 per session).
        self.http = aiohttp.ClientSession(headers=headers,
                                          connector=aiohttp.TCPConnector(limit=self.f.in_flight))
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            if not t.done():
                t.cancel()
        await self.http.close()

    def post(self, url: str, headers: dict | None = None, data: Any = None) -> _Pending:
        import asyncio

        task = asyncio.ensure_future(self._exchange(url, headers or {}, data))
        self.tasks.append(task)
        return _Pending(task)

    async def _exchange(self, url: str, headers: dict, data: Any) -> _Reply:
        import asyncio

        import aiohttp

        f = self.f
        timeout = aiohttp.ClientTimeout(total=f.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            async with self.limits.semaphore:
                await self.limits.wait_turn()
                t0 = time.perf_counter()
                try:
                    async with self.http.post(url, headers=headers, data=data, timeout=timeout) as resp:
                        status, text = resp.status, await resp.text()
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                except asyncio.TimeoutError:
                    status, text = 0, f"no answer within teacher.timeout_s={f.timeout_s:g} s"
                except aiohttp.ClientError as e:
                    status, text = 0, f"{type(e).__name__}: {e}"
                latency = time.perf_counter() - t0
            if status == 200:
                return _Reply({"status": 200, "body": text, "error": None, "latency_s": latency,
                               "attempts": attempt, "batch_id": self.batch_id})
            retryable = status == 0 or status in RETRY_STATUSES
            if not retryable or attempt > f.max_retries:
                what = f"HTTP {status}: {server_message(text)}" if status else text
                if retryable:
                    what = f"gave up after {attempt} attempt(s): {what}"
                return _Reply({"status": status, "body": "", "error": _scrub(what, f.key), "latency_s": None,
                               "attempts": attempt, "batch_id": self.batch_id})
            wait = f.retry_wait_s * 2 ** (attempt - 1)
            if retry_after is not None:
                wait = max(wait, retry_after)
            log.debug("HTTP %s from the endpoint; retry %d/%d in %.1f s", status or "timeout/connection error",
                      attempt, f.max_retries, wait)
            await asyncio.sleep(wait)


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (a number; an HTTP date), capped at MAX_RETRY_AFTER_S."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _SessionFactory:
    """Picklable ``session_factory`` for ``HttpRequestProcessorConfig``: each call (one per batch,
    in the HTTP actor) gives a ``_Session``. ``in_flight`` and ``rate`` are per actor."""

    def __init__(self, teacher: TeacherConfig, key: _Secret | None):
        actors = teacher.replicas
        self.name = uuid.uuid4().hex  # one set of limits per processor, shared by its batches
        self.key = key
        self.in_flight = max(1, math.ceil(teacher.concurrency / actors))
        self.rate = teacher.requests_per_s / actors if teacher.requests_per_s else None
        self.timeout_s = teacher.timeout_s
        self.max_retries = teacher.max_retries
        self.retry_wait_s = teacher.retry_wait_s

    def __call__(self) -> _Session:
        return _Session(self)

    def __repr__(self) -> str:
        return f"_SessionFactory(in_flight={self.in_flight}, rate={self.rate}, key=***)"


def _is_vllm_server(teacher: TeacherConfig, key: _Secret | None) -> bool:
    """True when ``{base_url}/models`` says the endpoint is a vLLM server (``owned_by: vllm``),
    whose ``return_tokens_as_token_ids`` extension gives exact token ids. Any failure → False."""
    import urllib.request

    req = urllib.request.Request(teacher.base_url.rstrip("/") + "/models")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key.reveal()}")
    try:
        with urllib.request.urlopen(req, timeout=min(10.0, teacher.timeout_s)) as resp:
            models = json.loads(resp.read()).get("data") or []
    except Exception as e:  # noqa: BLE001 - a probe only: any failure means "not known to be vLLM"
        log.debug("openai engine: GET /models failed (%s); not using vLLM's token-id extension", type(e).__name__)
        return False
    return any(m.get("owned_by") == "vllm" and m.get("id") == teacher.model for m in models if isinstance(m, dict))


def _payload(teacher: TeacherConfig, gen: GenerationConfig, token_ids: bool) -> dict:
    """The request body of one row, less its messages."""
    body: dict[str, Any] = dict(model=teacher.model, max_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                top_p=gen.top_p, seed=gen.seed)
    if gen.top_k_logprobs > 0 or token_ids:
        body["logprobs"] = True
        body["top_logprobs"] = gen.top_k_logprobs
    if token_ids:
        body["return_tokens_as_token_ids"] = True  # vLLM: logprob tokens read "token_id:123"
    return body


@lru_cache(maxsize=2)
def _tokenizer(name: str):
    """The teacher's tokenizer, loaded once per worker process (its tokenizer files only:
    ``models.model_metadata``)."""
    from transformers import AutoTokenizer

    from ..models import model_metadata

    return AutoTokenizer.from_pretrained(model_metadata(name))


def _token_id(token: str, tok) -> int:
    """Id of one logprob token: vLLM's ``token_id:N`` form, else the tokenizer's single id for the
    text; -1 when the text is not exactly one token of ``tok``."""
    if token.startswith("token_id:"):
        return int(token[len("token_id:"):])
    ids = tok.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else -1


def _answer_row(row: dict, k: int, tokenizer: str | None) -> dict:
    """One HTTP stage output row -> prompt columns + ``GENERATION_FIELDS``.

    ``finish_reason``: the endpoint's ``length`` stays ``length``; every other ending (``stop``,
    ``content_filter``, ...) is ``stop``; a failed request is ``error`` with ``error`` set.
    ``prompt_tokens``/``response_tokens`` come from the API's ``usage``. Token ids need
    ``tokenizer`` (``teacher.tokenizer``): exact ids from a vLLM server (its
    ``return_tokens_as_token_ids``), else the answer re-tokenized, with the tokenizer's EOS
    appended when it stopped by itself. Top-k ids only with exact ids (one row per answer id,
    ``schema.topk_problem``; a row that breaks it is an error row naming it): another endpoint's
    top tokens are text whose ids, and the rows they follow, need not match the re-tokenized
    answer, so its top-k ids stay null (its logprobs are kept). Without a tokenizer: empty ids.
    """
    reply = row.get("http_response") or {}
    out = {
        "prompt_id": row["prompt_id"], "split": row["split"], "task": row["task"],
        "messages": chat_messages(row["messages"]), "reference": row["reference"],
        "response": "", "response_token_ids": [], "finish_reason": "error", "prompt_tokens": 0,
        "response_tokens": 0, "latency_s": None, "batch_id": str(reply.get("batch_id") or ""),
        "top_logprobs_ids": None, "top_logprobs": None, "error": reply.get("error") or None,
    }
    if out["error"] or not reply:
        out["error"] = out["error"] or "no answer from the HTTP stage"
        return out
    try:
        body = json.loads(reply["body"])
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        out["error"] = f"unreadable answer ({type(e).__name__}: {e}): {server_message(reply.get('body') or '')}"
        return out
    usage = body.get("usage") or {}
    content = (choice.get("logprobs") or {}).get("content") or []
    tok = _tokenizer(tokenizer) if tokenizer else None
    ids: list[int] = []
    exact = bool(content) and all(str(c.get("token", "")).startswith("token_id:") for c in content)
    if tok is not None:
        if exact:
            ids = [_token_id(c["token"], tok) for c in content]
        else:
            ids = tok.encode(text, add_special_tokens=False)
            if choice.get("finish_reason") == "stop" and tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
    top_ids = top_lps = None
    if k and content and any(c.get("top_logprobs") for c in content):
        top_lps = [[float(t["logprob"]) for t in (c.get("top_logprobs") or [])[:k]] for c in content]
        if tok is not None and exact:
            top_ids = [[_token_id(str(t["token"]), tok) for t in (c.get("top_logprobs") or [])[:k]] for c in content]
    from ..schema import topk_problem

    problem = topk_problem(row["prompt_id"], ids, top_ids, top_lps)
    if problem:
        out["error"] = f"the endpoint's top-k logprobs do not pair with its token ids: {problem}"
        return out
    out.update(
        response=text, response_token_ids=ids,
        finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        response_tokens=int(usage.get("completion_tokens") or len(ids) or len(content)),
        latency_s=float(reply["latency_s"]), top_logprobs_ids=top_ids, top_logprobs=top_lps, error=None)
    return out


def exact_ids_problem(cfg) -> str | None:
    """Why this run's logit KD cannot use its ``openai`` teacher (None when it can, or when the run
    is not logit KD from an API teacher): logit KD needs the teacher's exact token ids, and only
    a vLLM server gives them (``return_tokens_as_token_ids``, detected from ``GET /models``).
    Another API's top-k tokens are text, which ``teacher.tokenizer`` may read as another id or as
    several, and its answer is re-tokenized; KD targets would not line up with the ids trained."""
    t = cfg.teacher
    if t.engine != "openai" or cfg.train.loss != "logit_kd":
        return None
    try:
        key = api_key(t)
    except ValueError:
        key = None  # the missing key is reported on its own; ask /models without one
    if t.tokenizer and _is_vllm_server(t, key):
        return None
    return (f"train.loss=logit_kd needs the teacher's exact token ids, and teacher.base_url {t.base_url} is not a "
            f"vLLM server serving {t.model!r} (GET /models names no such model owned by vllm; only vLLM's "
            "return_tokens_as_token_ids gives ids): an API's top-k tokens are text that teacher.tokenizer may split "
            "into other ids, so the KD targets would not line up with the answer's tokens. Use "
            "train.loss=sequence_kd (and generation.top_k_logprobs: 0), or serve the teacher with vLLM")


def openai_dataset(ds, teacher: TeacherConfig, gen: GenerationConfig):
    """Prompt rows -> answers from an OpenAI-compatible chat-completions endpoint; lazy.

    Each row is one ``POST {teacher.base_url}/chat/completions`` with ``model`` =
    ``teacher.model``, the row's ``messages``, ``max_tokens`` = ``gen.max_new_tokens``,
    ``temperature``, ``top_p``, ``seed``, and ``logprobs``/``top_logprobs`` when
    ``gen.top_k_logprobs`` > 0 (stored only when the endpoint returns them).

    Args:
        ds: ``ray.data.Dataset`` of rows with ``schema.PROMPTS_SCHEMA``.
        teacher: ``engine="openai"`` settings: ``base_url``, ``model``, ``api_key_env``,
            ``tokenizer``, ``requests_per_s`` (over all ``replicas``), ``concurrency`` (requests in
            flight over all replicas), ``timeout_s`` (per attempt), ``max_retries``,
            ``retry_wait_s``, ``batch_size`` (rows per Ray batch), ``replicas`` (HTTP actors,
            ``cpus_per_replica`` logical CPUs each).
    Returns:
        ``ray.data.Dataset`` of rows with every ``GENERATED_SCHEMA`` column (see ``_answer_row``):
        ``latency_s`` = seconds from sending the answered attempt to its full answer (earlier
        failed attempts and backoff waits excluded); ``batch_id`` = the Ray batch. A request
        that fails for good (a 400 for a prompt over the model's length, retries exhausted, a
        timeout) is a row with ``finish_reason`` "error" and ``error`` = the status and the
        server's message; the dataset goes on.
    Raises:
        ValueError: ``teacher.api_key_env`` names an unset or empty variable (before any request).
    """
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    key = api_key(teacher)
    token_ids = bool(teacher.tokenizer) and _is_vllm_server(teacher, key)
    base = _payload(teacher, gen, token_ids)
    log.info("openai engine: %s/chat/completions, model %s, %d actor(s), %d request(s) in flight, %s req/s, "
             "token ids: %s", teacher.base_url.rstrip("/"), teacher.model, teacher.replicas, teacher.concurrency,
             teacher.requests_per_s or "unlimited",
             ("exact (vLLM)" if token_ids else f"re-tokenized with {teacher.tokenizer}") if teacher.tokenizer
             else "none (no teacher.tokenizer)")

    def preprocess(row: dict) -> dict:
        return {"payload": dict(base, messages=chat_messages(row["messages"]))}

    config = HttpRequestProcessorConfig(
        url=teacher.base_url.rstrip("/") + "/chat/completions",
        headers=None,  # the key goes in the session, never in a logged or serialized config field
        qps=None, max_retries=0,  # both done per request by _Session (see the module docstring)
        batch_size=teacher.batch_size,
        concurrency=(teacher.replicas, teacher.replicas),
        session_factory=_SessionFactory(teacher, key),
        http_request_stage={"num_cpus": teacher.cpus_per_replica},
    )
    # The HTTP processor has no error rows of its own (_Session never raises), so its postprocess
    # sees every row, failed ones included.
    postprocess = partial(_answer_row, k=gen.top_k_logprobs, tokenizer=teacher.tokenizer)
    return build_processor(config, preprocess=preprocess, postprocess=postprocess)(ds)
