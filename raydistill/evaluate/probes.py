"""Model figures that do not come from the answers: memory, parameters and size on disk.

``model_info`` gives one model's probe and size figures for the report (null figures with a note
when it cannot be probed); ``memory_probe`` runs ``raydistill._probe`` in a fresh process, here or
in a Ray task on the node that can load the model; ``model_files`` reads the weight files' size and
dtype. Answers no prompt.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ..config import EngineConfig
from .rounds import engine_device

log = logging.getLogger(__name__)


def memory_probe(model_dir: str, messages: list, batch: int, dtype: str | None = None,
                 device: str | None = None) -> dict:
    """Run ``raydistill._probe`` in a fresh Python process (see its docstring for the keys).

    ``dtype``/``device``: as the model's evaluation engine ran it (default float32 on CPU).
    Raises RuntimeError with the probe's stderr when it fails.
    """
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "raydistill._probe", model_dir]
    if dtype:
        args += ["--dtype", dtype]
    if device:
        args += ["--device", device]
    # Prompts go through stdin: a command-line argument is capped at 128 KiB on Linux.
    proc = subprocess.run(args, input=json.dumps(messages[:batch]), capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise RuntimeError(f"memory probe failed for {model_dir}: {lines[-1] if lines else f'exit {proc.returncode}'}"
                           f"\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _remote_probe(ref: str, messages: list, batch: int, dtype: str, device: str, storage: dict | None) -> dict:
    """``memory_probe`` in a Ray task: reads ``ref`` on the task's node (``storage.local_copy``)."""
    from ..storage import local_copy

    return memory_probe(local_copy(ref, storage), messages, batch, dtype, device)


def _probe(path: str, ref: str, engine: EngineConfig, messages: list, batch: int, dtype: str, device: str,
           storage=None) -> dict:
    """``memory_probe`` where the model runs: here (``path``), unless the model is in S3 (``ref``
    ``s3://``: the driver holds no weights) or runs on a GPU this process does not see (a job's
    driver on a CPU head node); then in a Ray task with 1 CPU, or 1 GPU of the engine's
    ``accelerator_type``, which reads ``ref`` on its own node. The results are ``memory_probe``'s."""
    from ..runtime import on_gpu_machine
    from ..storage import is_remote

    if not is_remote(ref) and (device != "cuda" or on_gpu_machine()):
        return memory_probe(path, messages, batch, dtype, device)
    import ray

    if not ray.is_initialized():  # run_evaluate starts it; a probe alone does not start a Ray
        raise RuntimeError(f"memory probe of {ref} runs in a Ray task, and Ray is not started")
    options: dict = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
    if getattr(engine, "accelerator_type", None):
        options["accelerator_type"] = engine.accelerator_type
    task = ray.remote(_remote_probe).options(**options)
    return ray.get(task.remote(ref, messages, batch, dtype, device, storage.model_dump() if storage else None))


def model_files(path: str, ref: str | None = None, storage=None) -> tuple[float | None, str | None]:
    """(size of the weight files in MB, their dtype from config.json) of a local model folder, or of
    a hub id in the local HF cache (no download); (None, None) when neither is found. With an
    ``s3://`` ``ref`` the size comes from its S3 listing (``path`` may then hold no weights)."""
    from ..model_files import WEIGHT_SUFFIXES
    from ..models import size_on_disk_mb
    from ..storage import is_remote, remote_listing

    folder = Path(path)
    if ref and is_remote(ref):
        sizes = [s for name, (s, _) in remote_listing(ref, storage).items() if name.endswith(WEIGHT_SUFFIXES)]
        size = round(sum(sizes) / 1e6, 2) if sizes else None
    else:
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(path, local_files_only=True))
            except Exception:  # not cached, not a hub id: unknown, not an error
                return None, None
        size = round(size_on_disk_mb(folder), 2)
    config = folder / "config.json"
    stored = None
    if config.is_file():
        cfg = json.loads(config.read_text())
        stored = cfg.get("dtype") or cfg.get("torch_dtype")
    return size, stored


def model_info(path: str, engine: EngineConfig, probe_msgs: list, batch: int, ref: str | None = None,
                storage=None, probe: bool = True) -> dict:
    """Probe and size figures of one model; a failed probe leaves its figures null, with a note.
    An API teacher (``engine`` ``openai``) is not probed: its figures are null, with a note; nor is
    a model whose engine spans several GPUs (tensor or pipeline parallelism: one device cannot
    hold it), nor any model when ``probe`` is false (``eval.memory_probe``: its size on disk is
    still given). ``path``: the model on this machine; ``ref``: what a probe on another node reads
    (its ``s3://`` URI; default ``path``), see ``_probe``."""
    if engine.engine == "openai":
        return {"path": path, "dtype": None, "device": None, "size_mb": None, "size_dtype": None,
                "note": "memory and parameter figures are null: the teacher is an API endpoint "
                        "(teacher.engine=openai), there is no local model to probe"}
    dtype, device = engine_device(engine)
    info: dict = {"path": path, "dtype": dtype, "device": device}
    info["size_mb"], info["size_dtype"] = model_files(path, ref, storage)
    if not probe:
        info["note"] = "memory and parameter figures are null: eval.memory_probe is false"
        return info
    shards = engine.tensor_parallel_size * getattr(engine, "pipeline_parallel_size", 1)
    if shards > 1:
        info["note"] = (f"memory and parameter figures are null: the engine spans {shards} GPUs (tensor × pipeline "
                        "parallel), and the probe loads the model on one device")
        return info
    try:
        probe = _probe(path, ref or path, engine, probe_msgs, batch, dtype, device, storage)
        info.update({k: probe.get(k) for k in ("params", "model_memory_mb", "process_baseline_mb", "peak_memory_mb",
                                               "batch")})
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as e:  # OSError: the model is gone
        log.error("evaluate: %s", e)
        first = (str(e).splitlines() or [repr(e)])[0]
        info["note"] = f"memory and parameter figures are null: {first[:300]}"
    return info
