"""Helpers shared by the test modules (no fixtures: those are in conftest.py). A test module
imports from here or from conftest, never from another test module.

- run configs: ``user_config`` (a user's own JSONL with its own field names), ``eval_config``,
  ``kd_config`` (logit KD);
- finished corpora: ``write_corpus`` (simple teacher answers, as generate leaves a corpus) and
  ``write_topk_corpus`` (the tiny teacher's own answers with real top-k logprobs);
- ``finished_answers`` (answers as evaluate collects them), ``tiny_arch`` (GPT-2/OPT/GPT-NeoX),
  ``s3_files``, the Jobs API (``job_runtime_env``, ``wait_for_job``), the shipped YAML files
  (``SHIPPED``, ``classify``), ``assert_same_weights``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from raydistill.config import Config, load
from raydistill.schema import PROMPTS_SCHEMA
from raydistill.storage import storage_path

from .conftest import mixed_prompts, write_jsonl

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- run configs

def user_config(tmp_path: Path, tiny_model: Path, n_prompts: int, engine: str) -> tuple[Path, list[str]]:
    """A user's own JSONL (own field names) and a config file, plus the --set overrides."""
    from raydistill.data import split_key, split_of

    # One over-long prompt (in the train split: the split hashes the messages) must become an error row, not fail the run.
    long_text = next(t for k in range(100) for t in ["Paris " * 300 + str(k)]
                     if split_of(split_key([{"role": "user", "content": t}]), 0, 0.1, 0.2) == "train")
    long_row = {"qid": "long", "kind": "qa", "question": long_text, "answer": "Paris"}
    data = write_jsonl(tmp_path / "my_prompts.jsonl", mixed_prompts(n_prompts) + [long_row])
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tiny_model), "engine": engine, "batch_size": 16, "max_model_len": 160},
        "generation": {"max_new_tokens": 12, "top_k_logprobs": 3, "max_error_share": 0.2},
        # A random-weight teacher gives no final answers: keep its answers to train on (filters: tests/test_filters.py).
        "filter": {"empty": False, "no_final_answer": False},
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "train": {"workers": 2, "epochs": 4, "batch_size": 4, "lr": 3e-3, "max_seq_len": 128},
        "eval": {"engine": engine, "batch_size": 32, "memory_probe_batch": 2, "rounds": 2},
    }))
    sets = [f"data.path={data}", "data.prompt_field=question", "data.reference_field=answer",
            "data.id_field=qid", "data.task_field=kind"]
    return cfg_file, sets


def eval_config(tmp_path: Path, tiny_model: Path, rows: list[dict], extra: list[str] = ()) -> tuple[Path, list[str]]:
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tiny_model), "engine": "hf", "batch_size": 4, "max_model_len": 160},
        "generation": {"max_new_tokens": 12},
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "eval": {"engine": "hf", "batch_size": 4, "memory_probe_batch": 2},
    }))
    sets = [f"data.path={data}", "data.prompt_field=question", "data.reference_field=answer",
            "data.id_field=qid", "data.task_field=kind", *extra]
    return cfg_file, sets


TOP_K = 5


def kd_config(tmp_path: Path, tiny_model: Path, n_prompts: int, sets: list[str] = ()):
    """A logit-KD run config over ``n_prompts`` prompts: the pruned tiny teacher (layers 0 and 3)
    as the student, one worker, corpus top-k KD (forward_kl); ``sets`` override it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "prompts.jsonl", mixed_prompts(n_prompts))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "prompt_field": "question", "reference_field": "answer", "id_field": "qid",
                 "task_field": "kind"},
        "teacher": {"model": str(tiny_model), "engine": "hf"},
        "generation": {"max_new_tokens": 8, "top_k_logprobs": TOP_K},
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "train": {"workers": 1, "epochs": 4, "batch_size": 4, "lr": 3e-3, "max_seq_len": 128, "loss": "logit_kd",
                  "kd": {"teacher": "corpus", "divergence": "forward_kl", "alpha": 0.5}},
    }))
    return load(cfg_file, list(sets))


# ----------------------------------------------------------------------------- finished corpora

def varied_answer(i: int) -> str:
    """Answers of different lengths, so that the tokens of a batch tell which rows it held."""
    return "The answer is " + "very " * (i % 5) + f"{i % 7}."


def write_corpus(cfg, prompts: pa.Table | None = None, *, n: int | None = None,
                 answered: tuple[str, ...] | None = ("train", "validation"), varied: bool = False,
                 task_prompts: bool = False) -> pa.Table:
    """A finished corpus as generate leaves it, with simple teacher answers (no generation):
    ``prompts/`` (every split), ``data/part-00000.parquet`` (one answer per prompt of the
    ``answered`` splits; None: every split, test included; ``()``: none, no data file),
    ``config.yaml`` (the settings that made it) and ``manifest.json`` (written last).

    ``prompts``: the run's prompts (default ``load_prompts(cfg.data)``, with ``cfg.task_prompts``
    when ``task_prompts``); ``n``: only the first ``n`` of them; answers "The answer is 1.", or
    with ``varied`` ``varied_answer(i)``. Returns the prompts written."""
    from raydistill.corpus import write_prompts
    from raydistill.data import load_prompts, select_split
    from raydistill.schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform

    if prompts is None:
        prompts = load_prompts(cfg.data, cfg.task_prompts) if task_prompts else load_prompts(cfg.data)
    if n is not None:
        prompts = prompts.slice(0, n)
    corpus = Path(cfg.output_dir) / "corpus"
    corpus.mkdir(parents=True)
    write_prompts(corpus, prompts)
    chosen = prompts if answered is None else select_split(prompts, answered) if answered else prompts.slice(0, 0)
    rows = [dict(p, response=varied_answer(i) if varied else "The answer is 1.", response_token_ids=[],
                 finish_reason="stop", prompt_tokens=1, response_tokens=1, latency_s=0.1, batch_id="b", error=None,
                 teacher="t", generation_params="{}") for i, p in enumerate(chosen.to_pylist())]
    shards = []
    if rows:
        (corpus / "data").mkdir()
        pq.write_table(conform(pa.Table.from_pylist(rows), CORPUS_SCHEMA), corpus / "data" / "part-00000.parquet")
        shards = ["data/part-00000.parquet"]
    (corpus / "config.yaml").write_text(cfg.dump())
    (corpus / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "rows": len(rows),
                                                      "rows_generated": len(rows), "shards": shards}))
    return prompts


def write_topk_corpus(cfg, teacher_dir: Path, k: int = TOP_K) -> list[dict]:
    """A finished corpus (schema + manifest) of the teacher's own answers with real top-k logprobs.

    Per prompt (train and validation splits): greedy ids of the teacher, 3 to 8 tokens; every
    fourth answer is cut there (finish_reason ``length``), the others end with the stop id (EOS,
    finish_reason ``stop``). ``top_logprobs_ids`` / ``top_logprobs``: (response_tokens, k) from
    ``log_softmax`` of the teacher's logits at the position before each answer token (natural
    log, best first). The manifest records what generate records for logit KD: the teacher's
    tokenizer fingerprint, its vocabulary size, the stop ids and ``generation.top_k_logprobs``.
    Returns the corpus rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.chat import prompt_ids, tokenizer_fingerprint
    from raydistill.data import load_prompts
    from raydistill.schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    rows = []
    params = json.dumps(cfg.generation.model_dump())
    for i, p in enumerate(r for r in load_prompts(cfg.data).to_pylist() if r["split"] != "test"):
        prompt = prompt_ids(tok, p["messages"])
        ids: list[int] = []
        with torch.no_grad():
            for _ in range(3 + i % 6):  # greedy; the teacher's EOS ends the answer early
                nxt = int(model(torch.tensor([prompt + ids])).logits[0, -1].argmax())
                if nxt == eos:
                    break
                ids.append(nxt)
        finish = "length" if i % 4 == 3 and ids else "stop"
        if finish == "stop":
            ids.append(eos)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(ids) - 1].float(), dim=-1)
        top = lp.topk(k, dim=-1)
        rows.append(dict(p, response=tok.decode(ids, skip_special_tokens=True), response_token_ids=ids,
                         finish_reason=finish, prompt_tokens=len(prompt), response_tokens=len(ids), latency_s=0.1,
                         batch_id="b0", top_logprobs_ids=top.indices.tolist(), top_logprobs=top.values.tolist(),
                         error=None, teacher=cfg.teacher.model, generation_params=params))
    corpus = Path(cfg.output_dir) / "corpus"
    (corpus / "data").mkdir(parents=True)
    pq.write_table(conform(pa.Table.from_pylist(rows), CORPUS_SCHEMA), corpus / "data" / "part-00000.parquet")
    (corpus / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "rows": len(rows), "shards": ["data/part-00000.parquet"],
        "teacher": cfg.teacher.model, "teacher_tokenizer": tokenizer_fingerprint(tok), "teacher_vocab_size": len(tok),
        "stop_token_ids": [eos], "generation_params": cfg.generation.model_dump(),
        "response_tokens": sum(r["response_tokens"] for r in rows)}))
    return rows


# ----------------------------------------------------------------------------- evaluate, models, S3

def finished_answers(cfg) -> tuple[pa.Table, dict[str, pa.Table]]:
    """Answers as run_evaluate collects them: the teacher and student answered 4 prompts in two
    rounds; the baseline answered none (its prompts exceed its max_model_len)."""
    from raydistill.generate import GENERATED_SCHEMA

    msgs = [{"role": "user", "content": f"What is {i} plus 3?"} for i in range(4)]
    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "split": "test", "task": "math", "messages": [m],
                                     "reference": str(i + 3)} for i, m in enumerate(msgs)], schema=PROMPTS_SCHEMA)
    gen = dict(response_token_ids=[], top_logprobs_ids=None, top_logprobs=None, prompt_tokens=30)

    def answered(text):
        return [dict(p, **gen, response=text.format(i + 3), finish_reason="stop", response_tokens=5,
                     latency_s=0.5 + i / 10, batch_id=f"b{i}", error=None)
                for i, p in enumerate(prompts.to_pylist())]

    failed = [dict(p, **gen, response="", finish_reason="error", response_tokens=0, latency_s=None, batch_id="",
                   error="prompt has 30 tokens; max_model_len 24 - max_new_tokens 8 = 16") for p in prompts.to_pylist()]
    rounds = pa.array([0, 1, 0, 1], pa.int32())
    answers = {n: pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA).append_column("round", rounds)
               for n, rows in (("teacher", answered("The answer is {}.")), ("baseline_student", failed),
                               ("student", answered("It is {}.")))}
    return prompts, answers


def tiny_arch(folder, kind, tokenizer_dir):
    """A tiny random GPT-2, OPT or GPT-NeoX (4 layers) with the tiny model's tokenizer, built here."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=4, n_head=2, n_positions=128,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, ffn_dim=128,
                                         num_attention_heads=2, word_embed_proj_dim=64, max_position_embeddings=128,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                                                 num_attention_heads=2, intermediate_size=128,
                                                 max_position_embeddings=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def s3_files(uri: str) -> set[str]:
    """Every file under an s3:// folder, relative to it."""
    loc = storage_path(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return {i.path[len(loc.path):].lstrip("/") for i in infos if i.type == pafs.FileType.File}


# ----------------------------------------------------------------------------- the Jobs API

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")


def job_runtime_env() -> dict:
    import os

    return {"working_dir": str(REPO),
            "excludes": [".venv", "runs", ".git", ".pytest_cache", "**/__pycache__", "*.egg-info"],
            # The head was started without these: the job brings its own (as on a real cluster).
            "env_vars": {k: os.environ[k] for k in AWS_VARS if k in os.environ}}


def wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} did not finish in {timeout_s} s; log tail:\n{client.get_job_logs(job_id)[-4000:]}")


# ----------------------------------------------------------------------------- shipped YAML files

RUN_CONFIG_KEYS = set(Config.model_fields)
RUNTIME_ENV_KEYS = {"pip", "uv", "conda", "env_vars", "working_dir", "py_modules", "excludes", "container",
                    "image_uri", "py_executable", "java_jars", "config", "worker_process_setup_hook"}
SKIP_DIRS = {".venv", "venv", "runs", "build", "dist", "node_modules", "__pycache__", "tmp"}


def _skipped_dir(name: str) -> bool:
    return name.startswith(".") or name in SKIP_DIRS or name.endswith(".egg-info") or name.startswith("pytest-")


def shipped_yaml() -> list[Path]:
    """Every *.yaml / *.yml of the repository, at any depth (the recursive glob ``**/*.y{a,}ml``),
    outside .venv, runs, hidden, build and temp folders, which the walk does not enter."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(d))
        found += [Path(root) / f for f in files if fnmatch.fnmatch(f, "*.yaml") or fnmatch.fnmatch(f, "*.yml")]
    return sorted(found)


SHIPPED = shipped_yaml()


def classify(raw) -> str | None:
    """The kind of a parsed YAML document: run_config, launcher, kuberay, serve, runtime_env, or None."""
    if not isinstance(raw, dict) or not raw:
        return None
    if str(raw.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    if "provider" in raw and "available_node_types" in raw:
        return "launcher"
    if "applications" in raw:
        return "serve"
    if set(raw) <= RUN_CONFIG_KEYS:
        return "run_config"
    if set(raw) <= RUNTIME_ENV_KEYS:
        return "runtime_env"
    return None


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


# ----------------------------------------------------------------------------- weights

def assert_same_weights(sa: dict, sb: dict) -> None:
    """Equal up to float rounding amplified by AdamW: its update is about lr · g / |g| per element,
    so where a gradient is near 0 the summation-order noise of the two batchings flips it (measured:
    9 of 430,720 elements differ by more than 1e-5, at most 4.8e-5, after 3 steps at lr 1e-2 that
    moved the weights by 0.013 on average)."""
    diffs = torch.cat([(sa[n] - sb[n]).abs().flatten() for n in sa])
    assert diffs.max().item() < 1e-4, diffs.max().item()
    assert (diffs > 1e-5).float().mean().item() < 1e-4, int((diffs > 1e-5).sum())
