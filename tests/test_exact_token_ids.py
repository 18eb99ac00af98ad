"""Logit KD only with the teacher's exact token ids: an OpenAI-compatible teacher that is not a vLLM
server is refused up front (generate, validate), and wherever answer ids and top-k rows are paired
(generate writing a row, train reading one) their lengths and ids are checked, naming the row."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
import yaml

from raydistill.config import load
from raydistill.schema import SchemaError

from .conftest import mixed_prompts, write_jsonl


class _ModelsServer:
    """``GET /v1/models`` of an OpenAI-compatible endpoint whose model is owned by ``owner``."""

    def __init__(self, owner: str, model: str = "teacher-x"):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = json.dumps({"object": "list", "data": [{"id": model, "object": "model",
                                                               "owned_by": owner}]}).encode()
                self.send_response(200 if self.path.rstrip("/").endswith("/models") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(request):
    server = _ModelsServer(request.param)
    yield server
    server.close()


def _cfg(tmp_path, base_url, tokenizer, loss="logit_kd"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "prompts.jsonl", mixed_prompts(8))
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "prompt_field": "question", "reference_field": "answer", "id_field": "qid",
                 "task_field": "kind"},
        "teacher": {"engine": "openai", "model": "teacher-x", "base_url": base_url, "api_key_env": None,
                    "tokenizer": str(tokenizer)},
        "generation": {"max_new_tokens": 8, "top_k_logprobs": 5 if loss == "logit_kd" else 0},
        "student": {"init": "pretrained", "model": str(tokenizer)},
        "train": {"loss": loss},
    }))
    return load(f, [])


@pytest.mark.parametrize("api", ["deepseek"], indirect=True)
def test_logit_kd_from_an_api_that_is_not_vllm_is_refused_up_front(api, tmp_path, tiny_model):
    from raydistill.generate import GenerationError, run_generate
    from raydistill.generate.openai_engine import exact_ids_problem
    from raydistill.validate import preflight

    cfg = _cfg(tmp_path, api.url, tiny_model)
    msg = exact_ids_problem(cfg)
    assert msg and "train.loss=logit_kd needs the teacher's exact token ids" in msg and api.url in msg, msg
    assert "train.loss=sequence_kd" in msg and "generation.top_k_logprobs: 0" in msg
    assert msg in preflight(cfg, None)  # `raydistill validate`
    with pytest.raises(GenerationError, match="exact token ids"):
        run_generate(cfg)
    assert not (tmp_path / "run" / "corpus" / "generated").exists()  # refused before any prompt went out
    assert exact_ids_problem(_cfg(tmp_path / "seq", api.url, tiny_model, loss="sequence_kd")) is None


@pytest.mark.parametrize("api", ["vllm"], indirect=True)
def test_a_vllm_server_gives_exact_ids_and_is_accepted(api, tmp_path, tiny_model):
    from raydistill.generate.openai_engine import exact_ids_problem

    assert exact_ids_problem(_cfg(tmp_path, api.url, tiny_model)) is None


def _reply(content: list[dict], text: str) -> dict:
    body = {"choices": [{"message": {"content": text}, "finish_reason": "stop", "logprobs": {"content": content}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(content)}}
    return {"http_response": {"body": json.dumps(body), "latency_s": 0.1, "batch_id": "b"},
            "prompt_id": "q7", "split": "train", "task": "qa", "messages": [{"role": "user", "content": "hi"}],
            "reference": None}


def test_an_apis_text_tokens_give_no_top_k_ids(tiny_model):
    """A non-vLLM answer: top tokens are text (here one that is two tokens of the tokenizer); the
    answer ids are re-tokenized, so no top-k ids are written (before: -1 ids, misaligned rows)."""
    from transformers import AutoTokenizer

    from raydistill.generate.openai_engine import _answer_row

    tok = AutoTokenizer.from_pretrained(tiny_model)
    two = " Paris is"
    assert len(tok.encode(two, add_special_tokens=False)) > 1
    content = [{"token": t, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": -0.1},
                                                             {"token": two, "logprob": -2.0}]}
               for t in ("The", " capital")]
    row = _answer_row(_reply(content, "The capital"), k=2, tokenizer=str(tiny_model))
    assert row["error"] is None and row["response_token_ids"]
    assert row["top_logprobs_ids"] is None and len(row["top_logprobs"]) == 2


def test_exact_ids_pair_one_top_k_row_per_token(tiny_model):
    from raydistill.generate.openai_engine import _answer_row

    content = [{"token": f"token_id:{i}", "logprob": -0.1,
                "top_logprobs": [{"token": f"token_id:{i}", "logprob": -0.1}, {"token": "token_id:9", "logprob": -3}]}
               for i in (5, 6, 7)]
    row = _answer_row(_reply(content, "abc"), k=2, tokenizer=str(tiny_model))
    assert row["error"] is None and row["response_token_ids"] == [5, 6, 7]
    assert row["top_logprobs_ids"] == [[5, 9], [6, 9], [7, 9]]


def test_generate_writes_no_row_whose_top_k_rows_do_not_follow_its_ids():
    """vLLM's output row with one logprobs entry short: an error row naming the row, not shifted targets."""
    from raydistill.generate.vllm_engine import _vllm_row

    row = {"prompt_id": "q3", "split": "train", "task": "qa", "messages": [{"role": "user", "content": "hi"}],
           "reference": None, "generated_tokens": [11, 12, 13], "generated_text": "x", "time_taken_llm": 0.1,
           "logprobs": [{11: {"logprob": -0.1}, 2: {"logprob": -2.0}}, {12: {"logprob": -0.2}, 2: {"logprob": -2.5}}]}
    out = _vllm_row(row, k=2, stop_ids={2})
    assert out["finish_reason"] == "error" and "row q3: 3 answer token ids but 2 top-k id rows" in out["error"], out
    row["logprobs"].append({13: {"logprob": -0.3}, 2: {"logprob": -1.0}})
    ok = _vllm_row(row, k=2, stop_ids={2})
    assert ok["error"] is None and ok["top_logprobs_ids"] == [[11, 2], [12, 2], [13, 2]]


def _corpus_row(ids, top_ids, top_lps) -> pa.Table:
    return pa.Table.from_pylist([{
        "prompt_id": "q9", "messages": [{"role": "user", "content": "Two plus three?"}], "response": "five",
        "response_token_ids": ids, "finish_reason": "length", "error": None,
        "top_logprobs_ids": top_ids, "top_logprobs": top_lps}])


@pytest.mark.parametrize("top_ids, top_lps, want", [
    ([[5, 6], [6, 7]], [[-0.1, -2.0], [-0.1, -2.0]], "row q9: 3 answer token ids but 2 top-k id rows"),
    ([[5, 6], [6, -1], [7, 8]], [[-0.1, -2.0]] * 3, "row q9: token 1 has a top-k id that is not a token id"),
    (None, None, "row q9: 3 answer token ids but no top-k ids"),
])
def test_train_refuses_a_corpus_row_whose_top_k_rows_do_not_follow_its_ids(tiny_model, top_ids, top_lps, want):
    from raydistill.train.examples import TEACHER_IDS, tokenize_batch

    kwargs = dict(tokenizer_dir=str(tiny_model), max_len=64, source=TEACHER_IDS, stop_ids=[2],
                  truncated_answers="keep", with_topk=True, packing=False)
    with pytest.raises(SchemaError, match="train.loss=logit_kd") as e:
        tokenize_batch(_corpus_row([5, 6, 7], top_ids, top_lps), **kwargs)
    assert want in str(e.value), str(e.value)
    good = tokenize_batch(_corpus_row([5, 6, 7], [[5, 6], [6, 7], [7, 8]], [[-0.1, -2.0]] * 3), **kwargs)
    assert good.num_rows == 1 and good.column("topk_ids").to_pylist()[0] == [[5, 6], [6, 7], [7, 8]]
