"""The Ray Train worker: ``train_loop_per_worker`` runs on every rank, set up from one
``WorkerSettings`` that the driver (``train.stage``) builds, and hands the work to the Ray-free
``loop.train_loop``.

This module is the Ray adapter only: it loads the student (and an online teacher), wraps the
model for DDP/FSDP, and gives the loop Ray's process group, dataset shard, device and checkpoint
reports. What a step does is ``loop``; what is planned is ``stage`` and ``plan``. Importing it
imports neither Ray, torch nor pydantic (they are imported on the worker).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plan import Plan

if TYPE_CHECKING:
    from ..config import StorageConfig, TrainConfig

WORKER_ERROR_FILE = "worker_config_error.json"  # in train/: a config error a worker reports to the driver


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker is handed (pickled by Ray with the worker function; built once, by
    ``stage.fit``).

    ``train``, ``storage``: the run's ``train`` and ``storage`` config; ``student``: the student
    reference the workers load (an absolute local folder, a hub id or ``s3://``; fetched with
    ``storage.local_copy``); ``teacher``: the online teacher's reference (``train.kd.teacher=online``),
    else None; ``plan``: the steps (``plan.Plan``); ``pad_id``: the tokenizer's pad id (else its
    end of sequence); ``validation_dir``, ``ray_dir``, ``error_file``: URIs of the validation
    examples, Ray Train's run folder (checkpoints) and the file a config error is reported in;
    ``run_name``, ``params``, ``mlflow``: the MLflow run's name, parameters (the resolved config,
    JSON-able) and ``train.mlflow`` settings with the tracking URI resolved on the driver.
    """
    train: TrainConfig
    storage: StorageConfig
    student: str
    teacher: str | None
    plan: Plan
    pad_id: int
    validation_dir: str
    ray_dir: str
    error_file: str
    run_name: str
    params: dict[str, Any]
    mlflow: dict[str, Any]


def train_loop_per_worker(config: dict[str, WorkerSettings]) -> None:
    """Ray Train worker loop (one per rank): the Ray adapter of ``loop.train_loop``.
    ``config["settings"]`` is the ``WorkerSettings`` built by ``stage.fit`` (Ray Train passes its
    ``train_loop_config`` dict); the process group, the dataset shards, the device and the
    checkpoint reports are Ray Train's."""
    import functools

    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import ModelError
    from ..storage import local_copy, storage_path
    from . import parallel
    from .examples import collate, read_trained_rows
    from .loop import CheckpointStore, Collectives, student_load_dtype, train_loop
    from .observe import MlflowLogger

    s = config["settings"]
    t, storage = s.train, s.storage
    torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))  # Ray leaves a worker 1 thread
    torch.manual_seed(t.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ray_dir = storage_path(s.ray_dir, storage)
    kd_on = t.loss == "logit_kd"
    device = ray.train.torch.get_device()

    try:
        model = AutoModelForCausalLM.from_pretrained(local_copy(s.student, storage), dtype=student_load_dtype(t))
        if t.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                     target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
        teacher = None
        if kd_on and t.kd.teacher == "online":
            # one unsharded copy per worker: bf16 on GPU, fp32 on CPU (where bf16 is slower)
            teacher = AutoModelForCausalLM.from_pretrained(local_copy(s.teacher, storage),
                                                           dtype=torch.bfloat16 if t.use_gpu else torch.float32)
            teacher.eval().requires_grad_(False).to(device)
    except (ValueError, ModelError) as e:
        # A config error repeats on every retry: report it to the driver through a file and end
        # normally, so that Ray Train's failure policy (which retries every worker error) does not.
        if rank == 0:
            storage_path(s.error_file, storage).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    model = parallel.wrap_model(model, t.strategy, t.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def train_batches(epoch: int):
        shard = ray.train.get_dataset_shard("train")
        yield from shard.iter_batches(batch_size=t.batch_size, batch_format="numpy",
                                      local_shuffle_buffer_size=t.shuffle_buffer_rows,
                                      local_shuffle_seed=t.seed * 100003 + epoch)

    def validation_batches():
        return read_trained_rows(storage_path(s.validation_dir, storage), t.batch_size)

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    tracker = MlflowLogger(s.mlflow, run_name=s.run_name, params=s.params)  # rank 0 logs; a no-op if off
    train_loop(model, opt, t=t, plan=s.plan, rank=rank, world=world, device=device,
               collectives=Collectives(device, world), train_batches=train_batches,
               collate=functools.partial(collate, pad_id=s.pad_id, packing=t.packing,
                                         with_topk=kd_on and t.kd.teacher == "corpus"),
               validation_batches=validation_batches, teacher=teacher,
               store=CheckpointStore(ray_dir, t.keep_checkpoints, report=report), tracker=tracker,
               say=lambda msg: print(msg, flush=True))
    tracker.close()
