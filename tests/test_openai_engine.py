"""The ``openai`` engine against a real OpenAI-compatible server: vLLM's own API server on a tiny
model (``vllm_server``), behind a fault-injecting HTTP proxy on 127.0.0.1 that answers the first
requests 429/503 (or holds them past the timeout) and forwards the rest."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import threading
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pytest

from raydistill.config import ConfigError, GenerationConfig, TeacherConfig, load
from raydistill.schema import PROMPTS_SCHEMA


class FaultProxy:
    """A real HTTP server on 127.0.0.1 in a thread. ``faults`` is a list of what the next requests
    get, one entry per request: ``(429, retry_after_s)``, ``(503, None)`` or ``("hang", seconds)``
    (answer only after that delay); once it is empty, requests are forwarded to ``upstream``.
    ``seen``: one record per request (time, path, status answered, Authorization header, body hash)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.faults: list[tuple] = []
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _relay(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    chat = self.path.endswith("/chat/completions")
                    fault = proxy.faults.pop(0) if proxy.faults and chat else None
                record = {"t": time.monotonic(), "path": self.path, "auth": self.headers.get("Authorization"),
                          "body": hashlib.sha1(body).hexdigest()}
                if fault and fault[0] == "hang":
                    time.sleep(fault[1])
                    fault = None
                if fault:
                    status, retry_after = fault
                    record["status"], record["t_end"] = status, time.monotonic()
                    proxy.seen.append(record)
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                    payload = json.dumps({"error": {"message": f"injected {status}"}}).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                req = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body or None,
                                             method=method, headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        status, payload = resp.status, resp.read()
                except urllib.error.HTTPError as e:
                    status, payload = e.code, e.read()
                record["status"], record["t_end"] = status, time.monotonic()
                proxy.seen.append(record)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                self._relay("POST")

            def do_GET(self):
                self._relay("GET")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def completions(self) -> list[dict]:
        return [r for r in self.seen if r["path"].endswith("/chat/completions")]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(vllm_server):
    p = FaultProxy(vllm_server)
    yield p
    p.close()


def _prompts(texts: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"prompt_id": f"p{i}", "split": "train", "task": "qa",
          "messages": [{"role": "user", "content": t}], "reference": None} for i, t in enumerate(texts)],
        schema=PROMPTS_SCHEMA)


def _teacher(base_url: str, model, **kw) -> TeacherConfig:
    settings = dict(engine="openai", base_url=base_url, model=str(model), api_key_env=None, batch_size=4,
                    concurrency=2, max_retries=3, retry_wait_s=0.1, timeout_s=120)
    settings.update(kw)
    return TeacherConfig(**settings)


def _answer(prompts: pa.Table, teacher: TeacherConfig, **gen) -> dict[str, dict]:
    from raydistill.generate import generate_table

    table = generate_table(prompts, teacher.model, teacher, GenerationConfig(max_new_tokens=8, **gen))
    return {r["prompt_id"]: r for r in table.to_pylist()}


QUESTIONS = ["What is the capital of France?", "Two plus three?", "Hello!", "Tell me a fact."]


# --- no server needed -------------------------------------------------------------------------

def test_absent_or_empty_key_is_a_clear_error_naming_the_variable(monkeypatch):
    from raydistill.generate.openai_engine import api_key

    teacher = TeacherConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="m",
                            api_key_env="DEEPSEEK_API_KEY")
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(ValueError, match="teacher.api_key_env: environment variable DEEPSEEK_API_KEY is not set"):
        api_key(teacher)
    monkeypatch.setenv("DEEPSEEK_API_KEY", "  ")
    with pytest.raises(ValueError, match="DEEPSEEK_API_KEY"):
        api_key(teacher)
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-secret-123")
    key = api_key(teacher)
    assert key.reveal() == "sk-secret-123" and "sk-secret" not in repr(key) + str(key) + f"{key}"
    assert api_key(teacher.model_copy(update={"api_key_env": None})) is None


def test_retry_after_and_server_messages_are_read():
    from raydistill.generate.openai_engine import MAX_RETRY_AFTER_S, _retry_after
    from raydistill.openai_errors import server_message

    assert _retry_after("2") == 2.0 and _retry_after("0.5") == 0.5 and _retry_after(None) is None
    assert _retry_after("99999") == MAX_RETRY_AFTER_S and _retry_after("soon") is None
    assert 0 <= _retry_after("Thu, 01 Jan 1970 00:00:00 GMT") <= 0  # a date in the past: no wait
    assert server_message('{"error": {"message": "too long", "code": 400}}') == "too long"
    assert server_message('{"object": "error", "message": "bad model"}') == "bad model"
    assert server_message("<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert len(server_message("x" * 5000)) <= 501


def test_prune_student_with_an_api_teacher_is_refused_at_load():
    with pytest.raises(ConfigError, match="student.init=pretrained"):
        load(None, ["teacher.engine=openai", "teacher.base_url=http://127.0.0.1:8000/v1", "student.init=prune"])
    cfg = load(None, ["teacher.engine=openai", "teacher.base_url=http://127.0.0.1:8000/v1",
                      "student.init=pretrained", "student.model=some/student"])
    assert cfg.student.init == "pretrained"


def test_an_api_teacher_has_no_memory_probe():
    from raydistill.evaluate.probes import model_info

    teacher = TeacherConfig(engine="openai", base_url="http://127.0.0.1:9/v1", model="deepseek-chat")
    info = model_info("deepseek-chat", teacher, [], 4)
    assert info["dtype"] is None and info["size_mb"] is None and "API endpoint" in info["note"]


# --- against vLLM's own OpenAI server -----------------------------------------------------------

@pytest.mark.vllm
def test_answers_with_top_logprobs_and_exact_token_ids(vllm_server, tiny_model, ray_local):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _answer(_prompts(QUESTIONS), _teacher(vllm_server, tiny_model, tokenizer=str(tiny_model)),
                   top_k_logprobs=3)
    assert len(rows) == len(QUESTIONS)
    for r in rows.values():
        assert r["error"] is None and r["finish_reason"] in ("stop", "length")
        assert r["prompt_tokens"] > 0 and 0 < r["response_tokens"] <= 8 and r["latency_s"] > 0 and r["batch_id"]
        # vLLM's return_tokens_as_token_ids: the engine's own ids, one per generated token
        assert len(r["response_token_ids"]) == r["response_tokens"]
        text = tok.decode(r["response_token_ids"], skip_special_tokens=True)
        if "\ufffd" not in text:  # a random model's bytes may not form UTF-8: vLLM holds those back
            assert text == r["response"]
        assert len(r["top_logprobs"]) == len(r["top_logprobs_ids"]) == r["response_tokens"]
        for ids, lps in zip(r["top_logprobs_ids"], r["top_logprobs"], strict=True):
            assert len(ids) == len(lps) == 3 and all(0 <= i < len(tok) for i in ids)
            assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        # greedy: the chosen token is the most likely one
        assert [ids[0] for ids in r["top_logprobs_ids"]] == r["response_token_ids"]


@pytest.mark.vllm
def test_without_a_tokenizer_logprobs_are_kept_and_ids_left_empty(proxy, tiny_model, ray_local):
    # Every request held 1 s by the proxy: concurrency=2 puts exactly two in flight at once (Ray's
    # HTTP stage alone sends the requests of a batch one after another).
    proxy.faults = [("hang", 1)] * len(QUESTIONS)
    rows = _answer(_prompts(QUESTIONS), _teacher(proxy.base_url, tiny_model, concurrency=2), top_k_logprobs=2)
    for r in rows.values():
        assert r["error"] is None and r["response"] is not None
        assert r["response_token_ids"] == [] and r["top_logprobs_ids"] is None
        assert len(r["top_logprobs"]) == r["response_tokens"] and all(len(x) == 2 for x in r["top_logprobs"])
    seen = proxy.completions()
    # The most requests in flight at once: counted at each request's start (where the count can
    # rise), ignoring the last 0.2 s of a request (the proxy's threads stamp times a little late
    # under load). Counting every request that overlaps one request's whole span, as before, saw 3
    # when requests 3 and 4 each started as 1 and 2 ended: (0, 1.3), (0, 1.6), (1.3, 7.2), (1.6, 7.4).
    in_flight = max(sum(o["t"] <= r["t"] < o["t_end"] - 0.2 for o in seen) for r in seen)
    assert in_flight == 2, [(round(r["t"], 2), round(r["t_end"], 2)) for r in seen]


@pytest.mark.vllm
def test_requests_per_s_spaces_the_requests(proxy, tiny_model, ray_local):
    rows = _answer(_prompts(QUESTIONS), _teacher(proxy.base_url, tiny_model, concurrency=4, requests_per_s=4))
    assert all(r["error"] is None for r in rows.values())
    starts = sorted(r["t"] for r in proxy.completions())
    # 1 / 4 req/s: the span from the first request to the last is at least 0.8 x 3 x 0.25 s (without
    # the limit the 4 concurrent requests start together). Single gaps are not checked: on a loaded
    # machine requests reach the proxy late and bunch up (arrivals 0, 0.59, 0.594, 0.758 s seen).
    assert starts[-1] - starts[0] >= 0.8 * (len(starts) - 1) / 4, starts


@pytest.mark.vllm
def test_429_and_503_are_retried_and_retry_after_is_honoured(proxy, tiny_model, ray_local):
    proxy.faults = [(429, 1), (503, None), (503, None)]
    rows = _answer(_prompts(QUESTIONS), _teacher(proxy.base_url, tiny_model, concurrency=1, max_retries=3))
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in rows.values())
    seen = proxy.completions()
    assert [r["status"] for r in seen[:3]] == [429, 503, 503]
    assert sum(r["status"] == 200 for r in seen) == len(QUESTIONS) and len(seen) == len(QUESTIONS) + 3
    # the request answered 429 came back only after its Retry-After (1 s), not after retry_wait_s (0.1 s)
    first = seen[0]
    again = next(r for r in seen[1:] if r["body"] == first["body"])
    assert again["t"] - first["t"] >= 0.9


@pytest.mark.vllm
def test_with_no_retries_failed_requests_become_error_rows_and_the_job_goes_on(proxy, tiny_model, ray_local):
    proxy.faults = [(503, None), (429, None)]
    rows = _answer(_prompts(QUESTIONS), _teacher(proxy.base_url, tiny_model, concurrency=1, max_retries=0))
    errors = sorted(r["error"] for r in rows.values() if r["finish_reason"] == "error")
    assert len(errors) == 2, rows
    assert errors == ["gave up after 1 attempt(s): HTTP 429: injected 429",
                      "gave up after 1 attempt(s): HTTP 503: injected 503"]
    answered = [r for r in rows.values() if r["finish_reason"] != "error"]
    assert len(answered) == 2 and all(r["error"] is None and r["response_tokens"] > 0 for r in answered)
    assert len(proxy.completions()) == len(QUESTIONS)


@pytest.mark.vllm
def test_a_request_past_timeout_s_is_abandoned_and_retried(proxy, tiny_model, ray_local):
    # timeout_s=5, not 1: on a loaded machine (two test workers) the real answer took over 1 s
    proxy.faults = [("hang", 12)]
    t0 = time.monotonic()
    rows = _answer(_prompts(QUESTIONS[:1]), _teacher(proxy.base_url, tiny_model, timeout_s=5, max_retries=1))
    assert rows["p0"]["error"] is None and rows["p0"]["response_tokens"] > 0
    assert rows["p0"]["latency_s"] < 5  # the answered attempt, not the abandoned one
    proxy.faults = [("hang", 10), ("hang", 10)]
    rows = _answer(_prompts(QUESTIONS[:1]), _teacher(proxy.base_url, tiny_model, timeout_s=5, max_retries=1))
    assert rows["p0"]["finish_reason"] == "error"
    assert rows["p0"]["error"] == "gave up after 2 attempt(s): no answer within teacher.timeout_s=5 s"
    assert time.monotonic() - t0 < 90


@pytest.mark.vllm
def test_prompt_longer_than_the_server_allows_is_an_error_row(vllm_server, tiny_model, ray_local):
    rows = _answer(_prompts(QUESTIONS[:2] + ["Paris " * 400]), _teacher(vllm_server, tiny_model))
    bad = rows["p2"]
    assert bad["finish_reason"] == "error" and bad["response"] == "" and bad["response_token_ids"] == []
    assert bad["error"].startswith("HTTP 400: ") and "maximum context length is 256" in bad["error"]
    assert all(rows[p]["error"] is None and rows[p]["response_tokens"] > 0 for p in ("p0", "p1"))


@pytest.mark.vllm
def test_api_key_is_sent_but_never_shown(proxy, tiny_model, ray_local, monkeypatch, capfd, caplog):
    import ray

    key = "sk-test-" + hashlib.sha1(str(time.time()).encode()).hexdigest()
    teacher = _teacher(proxy.base_url, tiny_model, api_key_env="RAYDISTILL_TEST_KEY", tokenizer=str(tiny_model))
    monkeypatch.delenv("RAYDISTILL_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable RAYDISTILL_TEST_KEY is not set"):
        _answer(_prompts(QUESTIONS[:2]), teacher)
    assert proxy.seen == []  # refused before any request

    monkeypatch.setenv("RAYDISTILL_TEST_KEY", key)
    proxy.faults = [(400, None)]  # one error row: its message must not carry the key either
    caplog.set_level(logging.DEBUG)
    rows = _answer(_prompts(QUESTIONS[:2]), teacher)
    time.sleep(2)  # let Ray forward worker output to the driver
    assert {r["auth"] for r in proxy.seen} == {f"Bearer {key}"}  # /models probe and every completion
    assert sum(r["finish_reason"] == "error" for r in rows.values()) == 1
    out, err = capfd.readouterr()
    shown = out + err + caplog.text + json.dumps(rows, default=str)
    from raydistill.config import Config

    shown += Config(teacher=teacher.model_dump(), student={"init": "pretrained", "model": "s"}).dump()
    assert key not in shown
    # nor in anything Ray wrote for this session (worker logs, events, the dashboard's runtime envs)
    session = ray._private.worker._global_node.get_session_dir_path()
    from pathlib import Path

    for f in Path(session).rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert key.encode() not in f.read_bytes(), f
