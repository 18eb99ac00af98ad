"""The serve app without Ray or vLLM: the engine settings per arm (what reaches ray.serve.llm's
LLMConfig), the API-key decision and the model fingerprint the model cards carry."""

import hashlib
import json

import pytest

from raydistill.config import load
from raydistill.serve.app import llm_config


def test_cpu_arm_gets_the_vllm_cpu_env_and_one_cpu_bundle():
    arm = load(None, ["serve.student.kv_cache_gib=1", "serve.student.cpus_per_replica=2"]).serve.student
    c = llm_config("student", "/m", arm)
    assert c["engine_kwargs"] == {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    assert c["placement_group_config"] == {"bundles": [{"CPU": 2.0}]}
    assert c["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert c["deployment_config"] == {"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 16}


def test_gpu_arms_keep_one_node_per_replica_and_pass_no_local_env():
    cfg = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.tensor_parallel_size=8",
                      "serve.teacher.accelerator_type=H100", "serve.student.gpus_per_replica=0.5"])
    teacher = llm_config("teacher", "deepseek-ai/x", cfg.serve.teacher)
    assert teacher["engine_kwargs"]["tensor_parallel_size"] == 8
    assert teacher["engine_kwargs"]["dtype"] == "auto"  # vLLM picks float16 where bfloat16 is missing
    assert teacher["placement_group_config"] == {"bundles": [{"GPU": 1, "CPU": 1.0}] + [{"GPU": 1}] * 7,
                                                 "strategy": "STRICT_PACK"}
    assert teacher["accelerator_type"] == "H100"
    assert "runtime_env" not in teacher  # this machine's core binding and HF_HUB_OFFLINE stay here
    student = llm_config("student", "s3://b/run/student", cfg.serve.student)
    assert student["placement_group_config"] == {"bundles": [{"GPU": 0.5, "CPU": 1.0}]}
    assert student["engine_kwargs"]["gpu_memory_utilization"] == 0.45  # half of the GPU, as its share


# --------------------------------------------------------------------------- access and model cards

def test_auth_decision_on_each_kind_of_header():
    import hashlib

    from raydistill.serve.access import auth_problem

    key = "s3cret-key-123"
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert auth_problem(None, None) is None and auth_problem("Bearer anything", None) is None  # no key: open
    assert auth_problem(f"Bearer {key}", digest) is None
    assert auth_problem(f"bearer   {key} ", digest) is None  # scheme is case-insensitive
    assert auth_problem(None, digest).startswith("missing API key")
    assert auth_problem("  ", digest).startswith("missing API key")
    assert auth_problem(f"Basic {key}", digest).startswith("malformed Authorization header")
    assert auth_problem("Bearer", digest).startswith("malformed Authorization header")
    wrong = auth_problem("Bearer not-the-key", digest)
    assert wrong.startswith("invalid API key") and "not-the-key" not in wrong  # never echoes the key sent
    assert auth_problem(f"Bearer {key}x", digest).startswith("invalid API key")


def test_no_key_only_on_loopback_and_the_key_variable_must_be_set(monkeypatch):
    from raydistill.serve.access import api_key_digest, api_key_problem, is_loopback
    from raydistill.serve.app import serve_problems

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "myhost.internal"))
    assert api_key_problem(load(None)) is None and api_key_digest(load(None)) is None  # default: 127.0.0.1
    exposed = load(None, ["serve.host=0.0.0.0"])
    problem = api_key_problem(exposed)
    assert problem.startswith("serve.host is 0.0.0.0, reachable from other machines, and serve.api_key_env is "
                              "not set") and "Authorization: Bearer" in problem
    assert problem in serve_problems(exposed, check_port=False)
    monkeypatch.delenv("RAYDISTILL_TEST_KEY", raising=False)
    keyed = load(None, ["serve.host=0.0.0.0", "serve.api_key_env=RAYDISTILL_TEST_KEY"])
    assert api_key_problem(keyed).startswith("serve.api_key_env: environment variable RAYDISTILL_TEST_KEY is not set")
    with pytest.raises(ValueError, match="RAYDISTILL_TEST_KEY is not set"):
        api_key_digest(keyed)
    monkeypatch.setenv("RAYDISTILL_TEST_KEY", " k1 ")
    assert api_key_problem(keyed) is None
    assert api_key_digest(keyed) == hashlib.sha256(b"k1").hexdigest()  # only the digest reaches the ingress


def test_model_fingerprint_names_the_model_not_its_location(tmp_path):
    """Same files in two folders: one fingerprint, which shows neither folder; another config, another
    weight size or other weight values of the same size: another fingerprint; a hub id: its id."""
    import shutil

    from raydistill.models import ModelError
    from raydistill.serve.app import FINGERPRINT_CHARS, arm_fingerprints, model_fingerprint

    a = tmp_path / "run-a" / "student"
    a.mkdir(parents=True)
    (a / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (a / "model.safetensors").write_bytes(b"\0" * 100)
    (a / "tokenizer.json").write_text("{}")
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    fa = model_fingerprint(str(a))
    assert len(fa) == FINGERPRINT_CHARS and int(fa, 16) >= 0
    assert model_fingerprint(str(b)) == fa and str(tmp_path) not in fa
    (b / "tokenizer.json").write_text('{"changed": 1}')  # not a weight file: same model
    assert model_fingerprint(str(b)) == fa
    (b / "model.safetensors").write_bytes(b"\0" * 101)
    assert model_fingerprint(str(b)) != fa
    (b / "model.safetensors").write_bytes(b"\0" * 99 + b"\1")  # same size, other values (another training)
    assert model_fingerprint(str(b)) != fa
    (b / "model.safetensors").write_bytes(b"\0" * 100)
    assert model_fingerprint(str(b)) == fa
    (b / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    assert model_fingerprint(str(b)) != fa
    assert model_fingerprint("org/some-model") == hashlib.sha256(b"hub:org/some-model").hexdigest()[:FINGERPRINT_CHARS]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        model_fingerprint(str(tmp_path / "empty"))
    cfg = load(None, [f"output_dir={tmp_path / 'run-a'}", f"serve.teacher.model={b}"])
    assert arm_fingerprints(cfg) == {"teacher": model_fingerprint(str(b)), "student": fa}


def test_requests_are_tagged_ab_or_direct():
    from raydistill.serve import AB_MODEL, ARMS
    from raydistill.serve.routing import request_via

    assert request_via(AB_MODEL) == "ab"
    assert {request_via(arm) for arm in ARMS} == {"direct"}
    assert request_via(None) == "direct"
