"""``ABIngress``: Ray Serve LLM's OpenAI ingress with an A/B model, arm headers, per-arm metrics,
clear request errors and a health route. Imports ``ray.serve.llm`` (which needs vLLM): load it
through ``raydistill.serve.app.build_app``.

Ray's ``OpenAiIngress`` routes a request to the deployment named by its ``model`` field; this
subclass turns ``model: "ab"`` into ``teacher`` or ``student`` (``routing.pick_arm``) before
delegating, because the engine only knows its own model id.
"""

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any, Dict, Optional

from fastapi import Request
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..config import ABConfig
from ..data import first_bad_text
from . import AB_MODEL, ARM_HEADER, ARMS
from .access import auth_problem
from .routing import pick_arm, request_via

log = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0
SERVING = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # deployment statuses that answer requests
S3_URI = re.compile(r"s3://[^\s'\"]+")
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: renders any text, a lone surrogate included
    (Starlette's ``JSONResponse`` encodes UTF-8 and fails on one, which turned a 400 into a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """The one error shape of every 4xx and 5xx answer, OpenAI's:
    ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the request field at
    fault (None when none is), ``code`` is the HTTP status."""
    return AsciiJSONResponse(status_code=status, headers=headers,
                             content={"error": {"message": message, "type": type_, "param": param, "code": status}})


def _first_part(message: str, limit: int = 2000) -> str:
    """An engine's message without any traceback it carries, at most ``limit`` characters."""
    return message.split("\nTraceback (most recent call last)")[0].split("\n  File \"")[0][:limit]


def _field(loc) -> Optional[str]:
    """A pydantic error location (``("body", "messages", 0, "content")``) as ``messages[0].content``."""
    out = ""
    for part in loc or ():
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def http_error(request: Request, exc) -> JSONResponse:
    """Starlette's ``HTTPException`` (an unknown route: 404, a wrong method: 405) in the one error
    shape instead of FastAPI's ``{"detail": ...}``."""
    status = int(getattr(exc, "status_code", 500))
    kind = "not_found_error" if status == 404 else ("invalid_request_error" if status < 500 else "server_error")
    detail = getattr(exc, "detail", None)
    message = f"{request.method} {request.url.path}: {detail if isinstance(detail, str) else 'request refused'}"
    return error_response(status, message, type_=kind, headers=getattr(exc, "headers", None))


async def validation_error(request: Request, exc) -> JSONResponse:
    """FastAPI's handler of a request body that does not parse (``RequestValidationError``): a 400
    in the one error shape, naming the field and never echoing its value (Ray's handler put the
    value in ``param``, and a value holding a lone surrogate could not be rendered: a 500)."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    first = errors[0] if errors else {}
    field = _field(first.get("loc"))
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON (JSON decode error: {first.get('msg', '')})"
    else:
        message = f"{field or 'the request body'}: {first.get('msg', 'invalid request')}"
    return error_response(400, message, param=field)


UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)

#: Routes answered without a key (load balancers and probes): paths relative to the route prefix.
OPEN_PATHS = ("/health",)


class BearerAuth:
    """ASGI middleware: every HTTP request except ``OPEN_PATHS`` and CORS preflights (OPTIONS) needs
    ``Authorization: Bearer <key>`` (``access.auth_problem``); otherwise a 401 OpenAI-style error
    (type ``invalid_request_error``, code ``invalid_api_key``, header ``WWW-Authenticate: Bearer``),
    before the body is read. Added outermost, so an unauthenticated client learns nothing else
    (not even which routes exist).

    Args:
        key_digest: SHA-256 (hex) of the key (``access.api_key_digest``).
    """

    def __init__(self, app, key_digest: str):
        self.app, self.key_digest = app, key_digest

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            if path not in OPEN_PATHS:
                header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"),
                              None)
                problem = auth_problem(header, self.key_digest)
                if problem:
                    response = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                        "error": {"message": problem, "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}})
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _plain(value: Any) -> Any:
    """``value`` as plain dicts, lists and strings (messages may be pydantic models or TypedDicts)."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Request fields of OpenAI's chat and completions APIs that vLLM's request models do not declare
#: (so they land in ``model_extra``): accepted and ignored, as vLLM does, since clients and
#: frameworks send them; any other undeclared field is a 400 (a misspelt one would be ignored).
OPENAI_ONLY_FIELDS = frozenset({
    "store", "metadata", "service_tier", "audio", "modalities", "prediction", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "safety_identifier", "verbosity", "web_search_options",
    "moderation", "functions", "function_call", "best_of", "reasoning", "text", "include",
})

#: Exception type names meaning an arm's engine process is gone (vLLM's ``EngineDeadError``);
#: Serve replaces the replica (about 95 s here), so the answer is a 503 to retry, not a 500.
DEAD_ENGINE = ("EngineDeadError",)
RETRY_AFTER_S = 30


def _dead_engine(e: BaseException) -> bool:
    seen, hops = e, 0
    while seen is not None and hops < 20:
        if type(seen).__name__ in DEAD_ENGINE or any(n in str(type(seen)) for n in DEAD_ENGINE):
            return True
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
        hops += 1
    # Ray's LLM server hands an engine failure to the ingress as an error answer (an
    # OpenAIHTTPException with the engine's message and type), not as the exception itself
    text = " ".join(str(x) for x in (e, getattr(e, "message", ""), getattr(e, "type", "")))
    return any(n in text for n in DEAD_ENGINE)


def _cause(e: BaseException) -> BaseException:
    """The overload or unavailability error (``UNAVAILABLE``) inside a Ray error chain, else ``e``."""
    seen = e
    while seen is not None:
        if isinstance(seen, UNAVAILABLE):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return e


class ABIngress(OpenAiIngress):
    """The ingress deployment: Ray's ``OpenAiIngress`` plus

    - a third model ``ab`` (listed by ``/v1/models``): ``pick_arm`` chooses the arm from the sticky
      header's value (``ABConfig.sticky_header``) or at random;
    - ``x-raydistill-arm: teacher|student`` on every answer (the body's ``model`` field is the arm
      already: each engine serves under its arm's name);
    - Ray Serve metrics ``raydistill_requests`` (counter; tags arm, via, route, status) and
      ``raydistill_latency_ms`` (histogram of whole-answer time in ms, to the last streamed chunk;
      tags arm, via, route); ``via`` is ``ab`` for a request that asked for ``model: "ab"`` (an A/B
      user) and ``direct`` for one that named its arm (``bench-serve``, evaluate, direct callers),
      so the A/B comparison counts A/B traffic only;
    - checks Ray and vLLM leave unclear (no messages, ``max_tokens`` < 1 or past the arm's
      ``max_model_len``), and a 503 saying which arm is full when its replicas' running + queued
      limits are reached (Ray Serve's ``BackPressureError``);
    - ``GET /health``: 200 when every deployment of the application is HEALTHY and each arm's
      engine answers its health check, else 503 (with ``Retry-After``) listing them;
    - one error shape for every 4xx and 5xx (``error_response``), request validation errors
      included (``validation_error``); an arm whose engine died answers 503 with ``Retry-After``;
      unknown request fields and text that is not Unicode are 400s naming the field;
    - no storage location in any answer: the model cards carry a ``fingerprint``
      (``app.model_fingerprint``), request errors have the arms' model paths and ``s3://`` URIs
      replaced, and 5xx errors name only the exception type (details go to the log).

    The API key (``serve.api_key_env``) is checked before this class sees a request, by the
    ``BearerAuth`` middleware that ``app.build_app`` adds to the FastAPI app.

    Args (besides ``OpenAiIngress``'s):
        ab: ``ABConfig`` as a dict.
        limits: per arm ``{"max_model_len", "max_ongoing_requests", "max_queued_requests"}``.
        private: strings no error message may show (the arms' model references and resolved paths).
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, ab: Optional[Dict[str, Any]] = None,
                 limits: Optional[Dict[str, Dict[str, int]]] = None, private: Optional[list] = None):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard
        from ray.serve.metrics import Counter, Histogram

        self._ab = ABConfig.model_validate(ab or {})
        self._limits = limits or {}
        self._private = list(private or [])
        self._ab_card = ModelCard(id=AB_MODEL, object="model", owned_by="raydistill", permission=[],
                                  metadata={"model_id": AB_MODEL, "arms": list(ARMS), "weights": self._ab.weights,
                                            "sticky_header": self._ab.sticky_header})
        self._requests = Counter("raydistill_requests", description="Requests answered, per arm, via (ab: model "
                                 "'ab', an A/B user; direct: the arm named), route and HTTP status.",
                                 tag_keys=("arm", "via", "route", "status"))
        self._latency = Histogram("raydistill_latency_ms", description="Time to the whole answer (last streamed "
                                  "chunk), milliseconds, per arm and route.", boundaries=LATENCY_BOUNDARIES_MS,
                                  tag_keys=("arm", "via", "route"))

    async def model(self, model_id: str):
        if model_id == AB_MODEL:
            return self._ab_card
        return await super().model(model_id)

    async def models(self):
        listed = await super().models()
        listed.data.append(self._ab_card)
        return listed

    def _redact(self, text: str) -> str:
        """``text`` without the arms' storage locations (``private``) or any ``s3://`` URI."""
        for secret in self._private:
            text = text.replace(secret, "<model>")
        return S3_URI.sub("s3://<hidden>", text)

    def _record(self, arm: str, via: str, route: str, status: int, t0: float) -> None:
        self._requests.inc(tags={"arm": arm, "via": via, "route": route, "status": str(status)})
        if status < 400:
            self._latency.observe((time.perf_counter() - t0) * 1000, tags={"arm": arm, "via": via, "route": route})

    def _check(self, body, arm: str) -> Optional[JSONResponse]:
        """A 400 for what the engine would reject unclearly or ignore silently, or None: an unknown
        field (OpenAI's API refuses one; vLLM would drop it, so a misspelt ``max_completion_token``
        let the answer run to the model's own stop), text that is not Unicode (a lone UTF-16
        surrogate such as ``"\\ud83d"``: half an emoji), no messages, ``max_tokens`` < 1 or past
        the arm's ``max_model_len``."""
        extra = getattr(body, "model_extra", None) or {}
        ignored = sorted(k for k in extra if k in OPENAI_ONLY_FIELDS)
        if ignored:
            log.info("request fields of OpenAI's API that vLLM does not use, ignored: %s", ", ".join(ignored))
        unknown = sorted(k for k in extra if k not in OPENAI_ONLY_FIELDS)
        if unknown:
            return error_response(400, f"unknown field(s) {', '.join(map(repr, unknown))} in the request body; "
                                  "see the OpenAI API reference for the fields of this route", param=unknown[0])
        for field in ("messages", "prompt"):
            found = first_bad_text(_plain(getattr(body, field, None)), field)
            if found:
                where, text, i = found
                return error_response(400, f"{where} holds a lone UTF-16 surrogate \\u{ord(text[i]):04x} at "
                                      f"character {i + 1}: half of a pair is not Unicode text; send the whole pair "
                                      "(e.g. \\ud83d\\ude00) or remove it", param=where)
        if isinstance(body, ChatCompletionRequest) and not body.messages:
            return error_response(400, "messages is empty: give at least one message, e.g. "
                                  '[{"role": "user", "content": "Hello"}]', param="messages")
        max_len = self._limits.get(arm, {}).get("max_model_len")
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, field, None)
            if value is None:
                continue
            if value < 1:
                return error_response(400, f"{field} is {value}: it must be at least 1", param=field)
            if max_len and value > max_len:
                return error_response(400, f"{field} is {value}, past model {arm!r}'s maximum length of {max_len} "
                                      "tokens (prompt + answer); ask for fewer tokens", param=field)
        return None

    async def _answer(self, body, request: Request, method: str) -> Response:
        t0 = time.perf_counter()
        requested = body.model
        via = request_via(requested)
        if requested == AB_MODEL:
            arm = pick_arm(self._ab, request.headers.get(self._ab.sticky_header))
            body = body.model_copy(update={"model": arm})
        elif requested in ARMS:
            arm = requested
        else:
            served = [*ARMS, AB_MODEL]
            if not requested:
                return error_response(400, f"no model given; this endpoint serves {served}", param="model")
            return error_response(404, f"model {requested!r} is not served; this endpoint serves {served}",
                                  param="model", type_="model_not_found")
        headers = {ARM_HEADER: arm}
        bad = self._check(body, arm)
        if bad is not None:
            bad.headers.update(headers)
            self._record(arm, via, method, bad.status_code, t0)
            return bad
        try:
            response = await self._process_llm_request(body, call_method=method, raw_request=request)
        except Exception as e:  # noqa: BLE001 - each kind becomes its OpenAI-style answer below
            cause = _cause(e)
            if isinstance(cause, BackPressureError):
                lim = self._limits.get(arm, {})
                msg = (f"model {arm!r} is overloaded: its replicas are each running "
                       f"serve.{arm}.max_ongoing_requests={lim.get('max_ongoing_requests')} requests and "
                       f"serve.{arm}.max_queued_requests={lim.get('max_queued_requests')} more are waiting (a "
                       "queue counted by the ingress, not per replica); retry later")
                self._record(arm, via, method, 503, t0)
                return error_response(503, msg, type_="overloaded_error", headers=headers)
            if isinstance(cause, UNAVAILABLE):  # the arm's deployment or replica is down or restarting
                self._record(arm, via, method, 503, t0)
                return error_response(503, f"model {arm!r} is unavailable right now ({type(cause).__name__}: "
                                      f"{self._redact(str(cause))}); retry later", type_="unavailable_error",
                                      headers=headers)
            if _dead_engine(e):  # Serve restarts the replica; until then the arm cannot answer
                self._record(arm, via, method, 503, t0)
                log.error("model %r: its engine is dead (%s); Serve replaces the replica", arm, type(e).__name__)
                return error_response(503, f"model {arm!r} is restarting (its engine stopped); retry in "
                                      f"{RETRY_AFTER_S} s", type_="unavailable_error",
                                      headers={**headers, "Retry-After": str(RETRY_AFTER_S)})
            status = int(getattr(e, "status_code", None) or 500)
            message = getattr(e, "message", None) or getattr(e, "detail", None)
            if 400 <= status < 500 and message:
                self._record(arm, via, method, status, t0)
                return error_response(status, self._redact(_first_part(str(message))),
                                      type_=getattr(e, "type", None) or "invalid_request_error", headers=headers)
            self._record(arm, via, method, status, t0)
            request_id = uuid.uuid4().hex
            log.exception("model %r failed to answer request %s", arm, request_id)
            # the details (paths, stack) go to the server log only, under the request id
            return error_response(status if status >= 500 else 500, f"model {arm!r} failed to answer "
                                  f"({type(e).__name__}); the server log has the details under request id "
                                  f"{request_id}", type_="server_error", headers={**headers, "x-request-id": request_id})
        response.headers[ARM_HEADER] = arm
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._timed(response.body_iterator, arm, via, method, t0)
        else:
            self._record(arm, via, method, response.status_code, t0)
        return response

    async def _timed(self, chunks, arm: str, via: str, route: str, t0: float):
        status = 200
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException:
            status = 499  # the stream broke off (client gone or engine error)
            raise
        finally:
            self._record(arm, via, route, status, t0)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        """POST /v1/chat/completions (``stream: true`` → server-sent events)."""
        return await self._answer(body, request, "chat")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._answer(body, request, "completions")

    async def health(self) -> Response:
        """GET /health: 200 ``{"status": "ok", "deployments": {name: status}, "engines": {arm: state}}``
        when every deployment of this application is HEALTHY (or scaling up or down) and each arm's
        engine answers its health check (``ok``; ``busy`` when the check waited behind requests:
        a loaded arm is not a down one); else 503 with ``Retry-After`` and each deployment's status
        (e.g. UPDATING while the engines start) and each engine's state (``down (...)``).

        Ray's own routes say less: the proxy's ``/-/healthz`` answers once the proxy runs (engines
        may still be loading) and ``/-/routes`` lists route prefixes."""
        app_name = serve.get_replica_context().app_name
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                content={"status": "unavailable", "deployments": {},
                                                          "error": f"Serve's controller did not answer in "
                                                                   f"{HEALTH_TIMEOUT_S:g} s"})
        app = status.applications.get(app_name)
        deployments = {name: str(getattr(d.status, "value", d.status)) for name, d in (app.deployments if app else {}).items()}
        # scaling up or down still serves every request
        ok = bool(deployments) and all(s in SERVING for s in deployments.values())
        engines = await self._engines() if ok else {}
        ok = ok and all(v == "ok" or v.startswith("busy") for v in engines.values())
        return JSONResponse(status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)},
                            content={"status": "ok" if ok else "unavailable", "deployments": deployments,
                                     "engines": engines})

    async def _engines(self) -> Dict[str, str]:
        """Each arm's engine as one of its replicas sees it (``LLMServer.check_health``, what Serve's
        own health check calls, about every 10 s): ``ok``, or why not. A replica whose engine
        process died answers 500s until Serve's next check marks it unhealthy; this asks now."""
        async def one(arm: str) -> str:
            try:
                await asyncio.wait_for(self._default_serve_handles[arm].check_health.remote(), HEALTH_TIMEOUT_S)
                return "ok"
            except asyncio.TimeoutError:  # the check queues behind requests like any call: busy, not down
                return f"busy (no answer in {HEALTH_TIMEOUT_S:g} s)"
            except Exception as e:  # noqa: BLE001 - reported, not raised
                if isinstance(_cause(e), BackPressureError):
                    return "busy (queue full)"
                return f"down ({type(_cause(e)).__name__}{', engine dead' if _dead_engine(e) else ''})"

        arms = [a for a in ARMS if a in self._default_serve_handles]
        return dict(zip(arms, await asyncio.gather(*(one(a) for a in arms))))


def _route(method: str, path: str, **kwargs):
    return lambda app: getattr(app, method)(path, **kwargs)


# The routes ABIngress serves (a subset of Ray's DEFAULT_ENDPOINTS, plus /health).
ENDPOINTS = {
    "models": _route("get", "/v1/models"),
    "model_data": _route("get", "/v1/models/{model:path}"),
    "completions": _route("post", "/v1/completions"),
    "chat": _route("post", "/v1/chat/completions"),
    "health": _route("get", "/health"),
}
