"""Serving limits sized for where each arm runs (no Ray, no vLLM): every shipped config that serves on
GPUs sets ``max_ongoing_requests`` and ``max_queued_requests`` per arm, at least the engine's batch
(``serve.app.engine_batch_size``: ``max_num_seqs``, else vLLM's default for the GPU), and takes an
API key when it listens beyond loopback. Shipped configs are found by test_deploy_files' recursive glob."""

from __future__ import annotations

import yaml

from raydistill.config import load
from raydistill.serve import ARMS
from raydistill.serve.access import is_loopback
from raydistill.serve.app import VLLM_MAX_NUM_SEQS, engine_batch_size, llm_config, sizing_warnings

from .helpers import REPO, SHIPPED, classify, rel

LIMITS = ("max_ongoing_requests", "max_queued_requests")


def _gpu(cfg) -> bool:
    return (cfg.train.use_gpu or cfg.teacher.gpus_per_replica > 0
            or any(getattr(cfg.serve, a).gpus_per_replica > 0 for a in ARMS))


def _served_configs() -> list[tuple[str, object, dict]]:
    """(where, resolved config, what the file itself sets per arm) for every GPU run config and every
    Serve application (Serve config files, RayService) on GPUs."""
    out = []
    for path in SHIPPED:
        raw = yaml.safe_load(path.read_text())
        kind = classify(raw)
        if kind == "run_config":
            cfg = load(path)
            if _gpu(cfg):
                arms = {a: ((raw.get("serve") or {}).get(a) or {}) for a in ARMS}
                out.append((rel(path), cfg, arms))
            continue
        if kind == "kuberay" and raw["kind"] == "RayService":
            raw = yaml.safe_load(raw["spec"]["serveConfigV2"])
        elif kind != "serve":
            continue
        for app in raw["applications"]:
            args = app.get("args", {})
            sets = list(args.get("set", []))
            cfg = load(None if args.get("config", "demo") == "demo" else REPO / args["config"], sets)
            if any(getattr(cfg.serve, a).gpus_per_replica > 0 for a in ARMS):
                arms = {a: {k.split(".")[2].split("=")[0]: 1 for k in sets if k.startswith(f"serve.{a}.")} for a in ARMS}
                out.append((f"{rel(path)}:{app['name']}", cfg, arms))
    return out


def test_every_gpu_config_sizes_serving_for_its_engines():
    served = _served_configs()
    where = {w for w, _, _ in served}
    # the glob found the GPU job configs and the RayService
    assert {"jobs/configs/llama405b_fsdp.yaml", "jobs/configs/support_conversation.yaml",
            "jobs/configs/deepseek_math.yaml", "cluster/rayservice.yaml:raydistill"} <= where, where
    for w, cfg, raw_arms in served:
        for name in ARMS:
            arm = getattr(cfg.serve, name)
            missing = [k for k in LIMITS if k not in raw_arms[name]]
            assert not missing, f"{w}: serve.{name} leaves {missing} at the CPU demo's defaults"
            assert arm.gpus_per_replica > 0, f"{w}: serve.{name} runs on CPU in a GPU config"
            batch = engine_batch_size(arm)
            assert arm.max_ongoing_requests >= batch, \
                f"{w}: serve.{name}.max_ongoing_requests={arm.max_ongoing_requests} < the engine's batch {batch}"
            assert arm.max_queued_requests >= 1, f"{w}: serve.{name} queues nothing"
        assert sizing_warnings(cfg) == [], w
        assert is_loopback(cfg.serve.host) or cfg.serve.api_key_env, f"{w}: serves on {cfg.serve.host} without a key"


def test_engine_batch_follows_vllm_defaults_and_max_num_seqs_reaches_the_engine():
    cpu = load(None).serve.student
    assert engine_batch_size(cpu) == VLLM_MAX_NUM_SEQS["cpu"] == 128
    h200 = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.accelerator_type=H200"]).serve.teacher
    a100 = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.accelerator_type=A100"]).serve.teacher
    anywhere = load(None, ["serve.teacher.gpus_per_replica=1"]).serve.teacher
    assert (engine_batch_size(h200), engine_batch_size(a100), engine_batch_size(anywhere)) == (1024, 256, 1024)
    set_ = load(None, ["serve.student.gpus_per_replica=1", "serve.student.max_num_seqs=96"]).serve.student
    assert engine_batch_size(set_) == 96
    assert llm_config("student", "/m", set_)["engine_kwargs"]["max_num_seqs"] == 96
    assert "max_num_seqs" not in llm_config("student", "/m", cpu)["engine_kwargs"]  # vLLM's default


def test_the_cpu_defaults_on_a_gpu_arm_are_flagged():
    cfg = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.tensor_parallel_size=8",
                      "serve.teacher.accelerator_type=H200"])
    warnings = sizing_warnings(cfg)
    assert warnings == ["serve.teacher.max_ongoing_requests=8 is below the engine's batch of 1024 sequences "
                        "(max_num_seqs): each replica batches at most 8; set serve.teacher.max_ongoing_requests=1024 "
                        "(and max_queued_requests to a few seconds of the arm's requests)"]
    assert sizing_warnings(load(None)) == []  # the CPU demo's 8 is deliberate
