"""The train stage: Ray Train ``TorchTrainer`` fine-tunes the student on the teacher corpus.

Data path: the corpus is read with ``ray.data.read_parquet`` (local or ``s3://``), tokenized with
the student's tokenizer and chat template in Ray Data (``train.examples``) into
``train/examples/<split>/``, and each worker reads its own shard with
``ray.train.get_dataset_shard``: the driver holds counts, never examples. Every rank gets the same
number of rows (Ray's equal streaming split, in a fixed order), so every rank runs the same number
of steps; each worker reshuffles its rows every epoch with a local buffer seeded by
(``train.seed``, epoch), so a resumed run sees the batches an uninterrupted one would.

Losses (``train.loss``, ``train.losses``): ``sequence_kd`` (cross-entropy on the teacher's tokens)
or ``logit_kd`` (a divergence to the teacher's distribution, from the corpus's top-k logprobs or
an online teacher in every worker, mixed with that cross-entropy by ``train.kd.alpha``). The loss
of an optimizer step is the token mean over all its micro-batches (``train.grad_accum_steps``) and
all ranks.

Layout under ``output_dir`` (local or ``s3://``, see ``raydistill.layout``):
- ``baseline_student/``: the student before training (init=prune writes it, with
  ``raydistill_student_init.json``: the teacher and layers it was made from; it is rebuilt when
  they change; init=pretrained records the model reference in ``train/student_init.json`` instead);
- ``train/examples/``: the tokenized examples (rebuilt by every run that does not resume);
- ``train/ray/``: Ray Train's run folder with its checkpoints (every ``train.checkpoint_every_steps``
  or epoch; the latest ``train.keep_checkpoints`` and the best by validation loss are kept while
  training; all deleted once the student is exported unless ``train.delete_checkpoints`` is
  false). ``raydistill train`` after an interrupted run with unchanged settings
  (``train/resume_key.json``) resumes from the latest complete checkpoint (model, optimizer, step,
  data position); a worker that dies is restarted by Ray Train (``train.max_failures``) from there;
- ``train/_stage.json``: the record of a finished training (``train_stage``): a rerun with the
  same settings and inputs skips training, one with other settings is refused (``--overwrite``
  trains again);
- ``train/metrics.jsonl``: one JSON object per optimizer step (loss, ce, kd, lr, grad_norm, tokens,
  tokens_per_s, seconds; ``val_loss`` with its ``val_ce`` / ``val_kd`` parts at the end of each epoch
  when the corpus has validation rows);
- ``train/loss.png``: the loss curves (train, its parts, validation);
- ``train/summary.json``: steps, losses, which labels were trained (``label_source``), truncated
  answers and every row left out, per reason (``dropped``);
- ``student/``: the final student, ``save_pretrained`` format (LoRA merged), with tokenizer.

What the student learns is what the teacher said: when the student's tokenizer has the teacher's
token-id space, the labels are the teacher's own ``response_token_ids``; otherwise the answer
text is tokenized again (and logit KD is refused: the distributions would not line up). A
finished answer ends with the chat template's end of turn (e.g. ``<|im_end|>\\n``); an answer cut
at the token limit (finish_reason ``length``) gets no end of turn (``train.truncated_answers:
keep``) or is left out (``drop``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..config import Config, TrainConfig
from .checkpoints import (HF_SUBDIR, HISTORY_FILE, META_FILE, STATE_FILE, best_checkpoint,  # noqa: F401
                          checkpoint_dirs, checkpoint_step, latest_checkpoint, load_state, prune, write_meta)
from .examples import (COMPLETE, RETOKENIZED, TEACHER_IDS, build_example, choose_label_source,  # noqa: F401
                       collate, example_counts, local_teacher_tokenizer, read_trained_rows, trained_rows,
                       write_examples)
from .loop import lr_lambda  # noqa: F401  (the worker loop's schedule, Ray-free)
from .losses import IGNORE_INDEX  # noqa: F401

log = logging.getLogger(__name__)

BASELINE_RECIPE = "raydistill_student_init.json"  # in baseline_student/: what it was made from
WORKER_ERROR_FILE = "worker_config_error.json"


class VocabularyMismatch(ValueError):
    """Logit KD asked for with a teacher and student that do not share one token-id space."""


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * total)


def plan_steps(rows: int, workers: int, batch_size: int, grad_accum_steps: int) -> tuple[int, int, int]:
    """(rows per rank, micro-batches per rank per epoch, optimizer steps per epoch) for ``rows``
    train examples: Ray's equal split gives every rank ``rows // workers`` rows (the remainder is
    left out of each epoch), cut into micro-batches of ``batch_size``, ``grad_accum_steps`` of them
    per optimizer step (the last step of an epoch may have fewer)."""
    per_rank = rows // workers
    micro = math.ceil(per_rank / batch_size)
    return per_rank, micro, math.ceil(micro / grad_accum_steps)


def checkpoint_steps(total: int, steps_per_epoch: int, every: int, has_validation: bool) -> list[int]:
    """The optimizer steps after which the training loop saves a checkpoint (model + optimizer
    state; the last also holds the exported student), as the loop decides: every ``every`` steps
    (``train.checkpoint_every_steps``) within an epoch; at each epoch end before ``total`` when
    ``every`` is 0, falls on it, or validation ran (so the best by validation loss can be kept);
    and at ``total`` (the final one). Sorted, each step once."""
    steps = set()
    for s in range(1, total):
        if s % steps_per_epoch == 0:  # an epoch end
            if not every or s % every == 0 or has_validation:
                steps.add(s)
        elif every and s % every == 0:
            steps.add(s)
    return sorted(steps | {total})


def resume_key(cfg: Config, manifest: dict) -> dict:
    """What must be unchanged for an interrupted run to resume: the train settings except its
    length and when it stops (``early_stopping_patience``), which checkpoint is exported
    (``export``), checkpoint keeping, logging and where the workers run (``accelerator_type``:
    moving to another GPU type changes nothing trained), the student, the teacher and the corpus
    (rows, tokens, generation settings, tokenizer). ``train_stage`` adds the length, the stopping
    rule and the export back: they change the finished student."""
    train = cfg.train.model_dump(exclude={"epochs", "max_steps", "checkpoint_every_steps", "keep_checkpoints",
                                          "delete_checkpoints", "max_failures", "mlflow", "accelerator_type",
                                          "export", "early_stopping_patience"})
    corpus = {k: manifest.get(k) for k in ("rows", "response_tokens", "teacher", "generation_params",
                                           "teacher_tokenizer")}
    return {"train": train, "student": cfg.student.model_dump(), "teacher": cfg.teacher.model, "corpus": corpus}


def baseline_recipe(teacher_ref: str, teacher_dir: str | None, keep_layers: list[int] | None) -> dict:
    """What a pruned baseline student is made from: the teacher reference, the names and sizes of
    its weight files when it is a local folder (a folder whose weights changed makes another
    student; None for a hub id or ``s3://`` teacher, whose reference names it), and
    ``student.keep_layers`` as configured (None = the default choice)."""
    from ..models import _WEIGHT_SUFFIXES

    folder = Path(teacher_dir) if teacher_dir else None
    files = ({f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name.endswith(_WEIGHT_SUFFIXES)}
             if folder is not None and folder.is_dir() else None)
    return {"teacher": teacher_ref, "teacher_weights": files, "keep_layers": keep_layers}


def _local_teacher_dir(ref: str) -> str | None:
    """The teacher's folder when it is on this machine (a local path or an embedded model, converted
    here once), else None: a hub id or ``s3://`` teacher is never fetched by the driver."""
    from ..models import EMBEDDED_PREFIX, resolve_model
    from ..storage import is_remote

    if is_remote(ref):
        return None
    resolved = resolve_model(ref)
    return resolved if ref.startswith(EMBEDDED_PREFIX) or Path(resolved).is_dir() else None


def _prune_to(teacher_ref: str, keep_layers: list[int] | None, dest_uri: str, storage: dict,
              recipe: dict) -> list[int]:
    """Ray task body: fetch the teacher where this task runs (``models.resolve_model``; an ``s3://``
    teacher: ``storage.local_copy``), write its depth-pruned copy into a temporary folder, then
    replace ``dest_uri`` with it: a local destination by renaming a sibling folder (stale ones of
    killed builds are removed first); an ``s3://`` one by uploading, with ``BASELINE_RECIPE``
    written last, so that a cut upload is never taken for a finished one. Returns the kept layers.
    ``teacher_ref``: a local folder as an absolute path (workers do not share the driver's
    working directory)."""
    import tempfile

    from ..config import StorageConfig
    from ..models import cache_dir, prune_student, resolve_model
    from ..storage import local_copy, storage_path, upload_dir

    dest = storage_path(dest_uri, StorageConfig.model_validate(storage))
    teacher_dir = resolve_model(local_copy(teacher_ref, storage))
    if dest.remote:
        parent = cache_dir() / "tmp"
    else:
        parent = dest.local().parent
        for stale in parent.glob(dest.local().name + ".partial.*"):
            shutil.rmtree(stale, ignore_errors=True)
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=dest.name + ".partial.") as tmp:
        built = Path(tmp) / "student"
        keep = prune_student(teacher_dir, keep_layers, built)
        text = json.dumps(dict(recipe, kept=keep), indent=2)
        if dest.remote:
            upload_dir(built, dest)
            (dest / BASELINE_RECIPE).write_text(text)
        else:
            (built / BASELINE_RECIPE).write_text(text)
            shutil.rmtree(dest.local(), ignore_errors=True)
            built.rename(dest.local())
    return keep


def _ensure_baseline(cfg: Config) -> Path:
    """``output_dir/baseline_student`` for init=prune, (re)built when what made it differs from now
    (``baseline_recipe``). The pruning runs in a Ray task (Ray must be running), so the teacher's
    weights reach a worker, never the driver. Returns a local folder with the baseline's metadata
    files (for an ``s3://`` run a copy of only those, ``models.model_metadata``); raises ModelError
    when the teacher cannot be pruned (the task's own error, without Ray's wrapping)."""
    import ray

    from ..layout import pruned_baseline_dir
    from ..models import ModelError, model_metadata
    from ..storage import storage_path

    out = storage_path(cfg.output_dir, cfg.storage)
    dest = out / "baseline_student" if out.remote else storage_path(pruned_baseline_dir(cfg).resolve())
    local_teacher = _local_teacher_dir(cfg.teacher.model)
    recipe = baseline_recipe(cfg.teacher.model, local_teacher, cfg.student.keep_layers)
    recipe_file = dest / BASELINE_RECIPE
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    made = (dest / "config.json").is_file()
    if not (made and previous is not None and {k: previous.get(k) for k in recipe} == recipe):
        if made:
            changed = [k for k in recipe if previous is None or previous.get(k) != recipe[k]]
            log.warning("train: rebuilding %s: it was made from another %s", dest.uri,
                        " and ".join(changed) if previous else "recipe (no record of what made it)")
        # a local folder by its absolute path (the task's working directory is not the driver's);
        # an embedded model, hub id or s3:// teacher by its reference
        teacher = local_teacher if local_teacher and not cfg.teacher.model.startswith("embedded:") else cfg.teacher.model
        task = ray.remote(num_cpus=1, max_retries=0)(_prune_to)
        try:
            keep = ray.get(task.remote(teacher, cfg.student.keep_layers, dest.uri, cfg.storage.model_dump(), recipe))
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ModelError):
                raise e.cause from None
            raise
        log.info("train: pruned student keeps teacher layers %s -> %s", keep, dest.uri)
    return dest.local() if not dest.remote else model_metadata(dest.uri, cfg.storage)


def check_lora_targets(cfg: Config, student_dir: Path) -> None:
    """Raise ModelError when ``train.lora.target_modules`` names a module the student lacks
    (checked on the meta device: no weight is read)."""
    from ..models import ModelError, lora_target_problem, meta_model

    if not cfg.train.lora.enabled:
        return
    problem = lora_target_problem(meta_model(student_dir / "config.json"), cfg.train.lora.target_modules)
    if problem:
        raise ModelError(f"train.lora.target_modules: {problem}")


def _embedding_rows(model_dir: str | Path) -> int | None:
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def check_logit_kd(cfg: Config, manifest: dict, student_tokenizer, student_dir: Path, label_source: str,
                   why: str = "") -> None:
    """Refuse ``train.loss=logit_kd`` that cannot work, before any training.

    Raises ValueError when the corpus has no top-k logprobs (``train.kd.teacher=corpus``), and
    ``VocabularyMismatch`` when the teacher and the student do not share one token-id space: their
    tokenizers differ (``chat.tokenizer_fingerprint``), or a teacher id would fall outside the
    student's embedding matrix. An embedding matrix larger than the tokenizer is fine: the ids the
    tokenizers share map to the same rows. The message names both sizes and suggests sequence_kd.
    Runs for every kind of model reference (local folder, ``embedded:``, hub id, ``s3://``): the
    student is read from ``student_dir``, its metadata folder (``models.model_metadata``), and an
    online teacher from its own metadata files; no weight is read.
    """
    from ..chat import tokenizer_fingerprint

    t = cfg.train
    if t.loss != "logit_kd":
        return
    student_size = len(student_tokenizer)
    rows = _embedding_rows(student_dir)
    if t.kd.teacher == "corpus":
        k = (manifest.get("generation_params") or {}).get("top_k_logprobs") or 0
        if not k:
            raise ValueError("train.loss=logit_kd with train.kd.teacher=corpus needs the teacher's top-k logprobs, "
                             f"and the corpus at {cfg.output_dir}/corpus has none (generation.top_k_logprobs was 0): "
                             "set generation.top_k_logprobs: 20 in the config file and regenerate with "
                             "`raydistill generate CONFIG --overwrite`, or use train.kd.teacher=online or "
                             "train.loss=sequence_kd")
        if label_source == TEACHER_IDS:
            teacher_rows = manifest.get("teacher_vocab_size")
            if rows is not None and teacher_rows is not None and teacher_rows > rows:
                raise VocabularyMismatch(
                    f"train.loss=logit_kd: the teacher's tokenizer has {teacher_rows} tokens but the student's "
                    f"embedding matrix only {rows} rows: teacher ids past {rows - 1} have no student logit; "
                    "use train.loss=sequence_kd")
            return
        tok = local_teacher_tokenizer(cfg.teacher.model)
        teacher_size = manifest.get("teacher_vocab_size") or (len(tok) if tok is not None else "an unknown number of")
    else:
        from transformers import AutoTokenizer

        from ..models import ModelError, model_metadata

        try:
            teacher_meta = model_metadata(cfg.teacher.model, cfg.storage)  # config and tokenizer files only
        except ModelError as e:
            raise ValueError(f"train.kd.teacher=online: teacher.model: {e}") from e
        tok = AutoTokenizer.from_pretrained(teacher_meta)
        teacher_rows = _embedding_rows(teacher_meta)
        if tokenizer_fingerprint(tok) == tokenizer_fingerprint(student_tokenizer) and \
                (teacher_rows is None or rows is None or min(teacher_rows, rows) >= student_size):
            return
        teacher_size = len(tok)
        why = why or "their vocabularies differ"
    raise VocabularyMismatch(
        f"train.loss=logit_kd needs the teacher and the student to share one token-id space, and they do not: "
        f"the teacher's tokenizer ({cfg.teacher.model}) has {teacher_size} tokens, the student's has "
        f"{student_size} (embedding matrix: {rows} rows){f' and {why}' if why else ''}, so the teacher's "
        "distribution over its ids says nothing about the student's; use train.loss=sequence_kd (it trains "
        "on the teacher's text, tokenized again by the student)")


def _resolved(ref: str) -> str:
    from ..models import resolve_model

    return resolve_model(ref)


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """Ray Train worker loop (one per rank): the Ray adapter of ``loop.train_loop``. ``c`` carries
    the plain settings built by run_train; the process group, the dataset shards, the device and
    the checkpoint reports are Ray Train's."""
    import functools

    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import StorageConfig, TrainConfig
    from ..models import ModelError
    from ..storage import local_copy, storage_path
    from . import parallel
    from .loop import CheckpointStore, Collectives, Plan, student_load_dtype, train_loop
    from .observe import MlflowLogger

    t: TrainConfig = TrainConfig.model_validate(c["train"])
    storage = StorageConfig.model_validate(c["storage"])
    torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))  # Ray leaves a worker 1 thread
    torch.manual_seed(t.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ray_dir = storage_path(c["ray_dir"], storage)
    kd_on = t.loss == "logit_kd"
    device = ray.train.torch.get_device()

    try:
        model = AutoModelForCausalLM.from_pretrained(local_copy(c["student"], storage), dtype=student_load_dtype(t))
        if t.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                     target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
        teacher = None
        if kd_on and t.kd.teacher == "online":
            # one unsharded copy per worker: bf16 on GPU, fp32 on CPU (where bf16 is slower)
            teacher = AutoModelForCausalLM.from_pretrained(local_copy(c["teacher"], storage),
                                                           dtype=torch.bfloat16 if t.use_gpu else torch.float32)
            teacher.eval().requires_grad_(False).to(device)
    except (ValueError, ModelError) as e:
        # A config error repeats on every retry: report it to the driver through a file and end
        # normally, so that Ray Train's failure policy (which retries every worker error) does not.
        if rank == 0:
            storage_path(c["error_file"], storage).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
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
        return read_trained_rows(storage_path(c["validation_dir"], storage), t.batch_size)

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    plan = Plan(total_steps=c["total_steps"], warmup_steps=c["warmup_steps"], steps_per_epoch=c["steps_per_epoch"],
                micro_per_epoch=c["micro_per_epoch"], vocab=c["vocab"], has_validation=c["has_validation"])
    tracker = MlflowLogger(c["mlflow"], run_name=c["run_name"], params=c["params"])  # rank 0 logs; a no-op if off
    train_loop(model, opt, t=t, plan=plan, rank=rank, world=world, device=device,
               collectives=Collectives(device, world), train_batches=train_batches,
               collate=functools.partial(collate, pad_id=c["pad_id"], packing=t.packing,
                                         with_topk=kd_on and t.kd.teacher == "corpus"),
               validation_batches=validation_batches, teacher=teacher,
               store=CheckpointStore(ray_dir, t.keep_checkpoints, report=report), tracker=tracker,
               say=lambda msg: print(msg, flush=True))
    tracker.close()


def scaling_config(t: TrainConfig):
    """Ray Train's ``ScalingConfig`` for ``train``: ``workers`` workers of ``cpus_per_worker`` CPUs,
    plus 1 GPU each with ``use_gpu`` (of ``accelerator_type`` when set: Ray adds a 0.001
    ``accelerator_type:<type>`` resource to every worker's bundle). ``resources.stage_asks`` counts
    the same bundles."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, accelerator_type=t.accelerator_type,
                                   resources_per_worker={"CPU": t.cpus_per_worker})


def _trainer_class():
    """``TorchTrainer`` whose Ctrl-C ends training with KeyboardInterrupt.

    Ray Train 2.60's ``fit()`` installs its own SIGINT handler (``_register_sigint_handler``): it
    aborts the run's controller and then calls ``sys.exit(0)`` when the dead controller answers
    with RayActorError (Ray's own comment notes the process "still exits with 1"). No
    KeyboardInterrupt reaches the caller, so the CLI printed nothing and exited 1. This handler
    aborts the same way (workers stop, written checkpoints stay) and raises KeyboardInterrupt.
    ``run_train`` puts the previous handler back after ``fit`` (Ray leaves its own installed).
    """
    import ray
    from ray.train.torch import TorchTrainer

    class _Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            def on_sigint(signum, frame):
                log.warning("train: interrupted (SIGINT); stopping the workers ...")
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # the controller exits while aborting
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    return _Trainer


def _log_dropped(split: str, dropped: dict, cfg: Config) -> None:
    why = {"error": "failed answers (error rows; generate keeps them in corpus/rejects/)",
           "truncated": "truncated answers (train.truncated_answers=drop)",
           "too_long": f"prompt longer than train.max_seq_len={cfg.train.max_seq_len} tokens",
           "uneven_split": f"left out each epoch by the equal split over train.workers={cfg.train.workers}"}
    for reason, n in dropped.items():
        if n:
            log.warning("train: %d %s row(s) left out: %s", n, split, why[reason])


def _mlflow_settings(t, train_dir) -> dict:
    """``train.mlflow`` with the tracking URI resolved on the driver: the configured one, else
    ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/train/mlflow.db`` for a local output_dir
    (a relative default would land in the Ray worker's own working directory)."""
    import os

    settings = t.mlflow.model_dump()
    if settings["tracking_uri"] is None and not os.environ.get("MLFLOW_TRACKING_URI") and not train_dir.remote:
        settings["tracking_uri"] = f"sqlite:///{train_dir.local() / 'mlflow.db'}"
        settings["artifact_location"] = str(train_dir.local() / "mlruns")
    return settings


def _examples_dataset(folder):
    import ray

    files = folder.files(".parquet")
    return ray.data.read_parquet([f.path for f in files], filesystem=folder.fs).map_batches(
        trained_rows, batch_format="pyarrow", batch_size=None)


def train_stage(cfg: Config, manifest: dict):
    """The train stage's completion record (``raydistill.stages``; ``train/_stage.json``).

    Settings: the ``resume_key`` train settings plus the run length (``epochs``, ``max_steps``: a
    longer run is another student) but not ``cpus_per_worker`` (threads change nothing trained),
    the student and the teacher. Inputs: the corpus (its manifest's figures and the manifest
    file's size and mtime: a regenerated corpus is a new input) and, for ``init=pretrained`` with
    a local or ``s3://`` folder, that folder's files. Outputs: ``student/`` and ``train/summary.json``."""
    from ..corpus import MANIFEST
    from ..layout import corpus_location
    from ..stages import RECORD, Stage, fingerprint
    from ..storage import is_remote, storage_path

    key = resume_key(cfg, manifest)
    train = {k: v for k, v in key["train"].items() if k != "cpus_per_worker"}
    train.update(epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, export=cfg.train.export,
                 early_stopping_patience=cfg.train.early_stopping_patience)
    inputs = {"corpus": key["corpus"], "corpus_manifest": fingerprint(corpus_location(cfg) / MANIFEST)}
    model = cfg.student.model
    if cfg.student.init == "pretrained" and model and (is_remote(model) or Path(model).exists()):
        inputs["student_model"] = fingerprint(storage_path(model, cfg.storage))
    out = storage_path(cfg.output_dir, cfg.storage)
    return Stage("train", out / "train" / RECORD, {"student": out / "student", "summary": out / "train" / "summary.json"},
                 settings={"train": train, "student": key["student"], "teacher": key["teacher"]}, inputs=inputs)


def run_train(cfg: Config, overwrite: bool = False) -> dict:
    """Train the student on ``corpus/`` (split=train) and write ``student/`` + ``train/``.

    A finished training made from the same settings and inputs is not done again (``train_stage``:
    its summary is returned); one made with other settings is refused (StageSettingsChanged, a
    ValueError naming the differences) unless ``overwrite``, which also starts an interrupted run
    afresh instead of resuming it.

    Raises FileNotFoundError without a finished corpus, ModelError for a student that cannot be
    built or LoRA targets it lacks, ValueError (``VocabularyMismatch``) for logit KD that cannot
    work, or when no example fits ``train.max_seq_len`` (all checked before Ray Train starts), or
    a config error surfaces on the workers (never retried), and KeyboardInterrupt on Ctrl-C
    (checkpoints kept: the next run resumes). Returns the summary written to ``train/summary.json``.
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from transformers import AutoTokenizer

    from ..chat import stop_token_ids
    from ..corpus import read_manifest
    from ..layout import corpus_location
    from ..models import model_metadata, require_chat_template, resolve_model
    from ..runtime import init_ray, provenance
    from ..storage import storage_path, upload_dir
    from .observe import plot_losses

    out = storage_path(cfg.output_dir, cfg.storage)
    corpus = corpus_location(cfg)
    manifest = read_manifest(corpus)
    t = cfg.train
    train_dir = out / "train"
    stage = train_stage(cfg, manifest)
    if stage.done(overwrite):
        return json.loads((train_dir / "summary.json").read_text())
    ray_dir = train_dir / "ray"
    train_dir.mkdir()
    if cfg.student.init == "prune":
        init_ray()  # the pruning runs in a Ray task
        student_dir = _ensure_baseline(cfg)
        # absolute (Ray tasks and workers run elsewhere); an s3:// run's workers read the run's storage
        student_ref = (out / "baseline_student").uri if out.remote else str(student_dir)
    else:
        student_ref = resolve_model(cfg.student.model)
        if Path(student_ref).exists():
            # Ray Train workers do not run in the driver's working directory: hand them absolute paths.
            student_ref = str(Path(student_ref).resolve())
        # Its config and tokenizer files (a hub id or s3:// student: fetched, without its weights),
        # so that every check below runs for every kind of reference; the workers load the weights.
        student_dir = model_metadata(student_ref, cfg.storage)
    check_lora_targets(cfg, student_dir)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    require_chat_template(tokenizer, str(student_dir))
    source, why = choose_label_source(tokenizer, manifest, cfg)
    log.info("train: labels are %s (%s)", source.replace("_", " "), why)
    check_logit_kd(cfg, manifest, tokenizer, student_dir, source, why)
    stop_ids = set(manifest.get("stop_token_ids") or []) | stop_token_ids(student_dir)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    if t.mlflow.enabled:
        from .observe import require_mlflow

        require_mlflow()

    # Every refusal above comes before anything of an earlier run is deleted.
    # An interrupted run (no summary.json yet) with the same settings resumes from its latest
    # checkpoint; one whose settings or corpus changed, or any with --overwrite, starts afresh (a
    # finished run was skipped or refused above). Only the training length (epochs, max_steps)
    # and checkpoint keeping may change on resume.
    key = resume_key(cfg, manifest)
    key_file = train_dir / "resume_key.json"
    found = latest_checkpoint(ray_dir)
    previous_key = json.loads(key_file.read_text()) if key_file.is_file() else None
    finished = (train_dir / "summary.json").is_file()
    resumed_from = None
    if found and not finished and previous_key == key and not overwrite:
        resumed_from = found[1]["step"]
        log.info("train: resuming an interrupted run from its latest checkpoint (step %d, %s)", resumed_from, found[0])
        # Ray's own record of the run may lag the folder (see latest_checkpoint) or name
        # checkpoints that were removed; the workers resume from the folder, Ray starts a new record.
        (ray_dir / "checkpoint_manager_snapshot.json").delete()
        best = best_checkpoint(ray_dir)
        keep = {found[0].path} | ({best[0].path} if best else set())
        for d in checkpoint_dirs(ray_dir):
            if d.path not in keep:
                d.delete()
    else:
        if found and not finished and overwrite:
            log.info("train: --overwrite: the interrupted run's checkpoints are deleted; starting afresh")
        elif found and not finished:
            log.warning("train: settings or corpus changed since the interrupted run; starting afresh")
        ray_dir.delete()
        for stale in ("summary.json", "metrics.jsonl", "loss.png", "examples"):
            (train_dir / stale).delete()
    key_file.write_text(json.dumps(key, indent=2))
    # The previous student no longer describes this training: never leave it for evaluate.
    stage.forget()
    (out / "student").delete()
    (train_dir / "student_init.json").write_text(json.dumps(
        {"init": cfg.student.init, "baseline_student": student_ref, "teacher": cfg.teacher.model,
         "keep_layers": cfg.student.keep_layers}, indent=2))

    init_ray()
    with_topk = t.loss == "logit_kd" and t.kd.teacher == "corpus"
    data_files = [(corpus / f).path for f in manifest.get("shards", [])]
    counts = {}
    for split in ("train", "validation"):
        folder = train_dir / "examples" / split
        if resumed_from is not None and (folder / COMPLETE).is_file():
            # the interrupted run's examples, in their order: the resumed run skips exactly what it trained
            counts[split] = example_counts(folder)
            continue
        counts[split] = write_examples(data_files, corpus.fs, split, folder, tokenizer_dir=student_ref, cfg=cfg,
                                       source=source, stop_ids=stop_ids, with_topk=with_topk,
                                       rows=manifest.get("splits", {}).get(split))
    n_train, n_val = counts["train"]["rows"], counts["validation"]["rows"]
    dropped = dict(counts["train"]["dropped"])
    if not n_train and not any(dropped.values()):
        raise ValueError(f"the corpus at {corpus} has no usable train rows")
    if not n_train:
        raise ValueError(f"no train example fits train.max_seq_len={t.max_seq_len} tokens (rows left out: {dropped})")
    per_rank, micro_per_epoch, steps_per_epoch = plan_steps(n_train, t.workers, t.batch_size, t.grad_accum_steps)
    if per_rank == 0:
        raise ValueError(f"{n_train} train examples cannot feed {t.workers} workers")
    dropped["uneven_split"] = n_train % t.workers
    truncated = counts["train"]["truncated"]
    _log_dropped("train", dropped, cfg)
    _log_dropped("validation", counts["validation"]["dropped"], cfg)
    total = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    if resumed_from is not None and resumed_from > total:
        raise ValueError(f"the interrupted run already trained {resumed_from} steps, past this run's length of "
                         f"{total} steps (train.epochs={t.epochs}, train.max_steps={t.max_steps}): raise them to "
                         f"continue it, or delete {ray_dir} to start afresh")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    datasets = {"train": _examples_dataset(train_dir / "examples" / "train")}
    has_validation = bool(n_val)  # read whole by every rank, with pyarrow (examples.read_trained_rows)
    error_file = train_dir / WORKER_ERROR_FILE
    error_file.delete()
    teacher_ref = str(_resolved(cfg.teacher.model)) if t.loss == "logit_kd" and t.kd.teacher == "online" else None
    loop_cfg = {"train": t.model_dump(), "storage": cfg.storage.model_dump(), "student": student_ref,
                "teacher": teacher_ref, "vocab": len(tokenizer), "total_steps": total,
                "warmup_steps": warmup_steps(total, t.warmup_ratio), "steps_per_epoch": steps_per_epoch,
                "micro_per_epoch": micro_per_epoch, "pad_id": pad_id, "has_validation": has_validation,
                "validation_dir": (train_dir / "examples" / "validation").uri,
                "ray_dir": ray_dir.uri, "error_file": error_file.uri,
                "run_name": f"raydistill {t.loss} {out.uri}", "params": cfg.model_dump(mode="json"),
                "mlflow": _mlflow_settings(t, train_dir)}
    log.info("train: %d examples, %d workers x batch %d x %d accumulation, %d steps (%d/epoch), loss %s%s",
             n_train, t.workers, t.batch_size, t.grad_accum_steps, total, steps_per_epoch, t.loss,
             f" ({t.kd.divergence}, T={t.kd.temperature}, alpha={t.kd.alpha}, teacher {t.kd.teacher})"
             if t.loss == "logit_kd" else "")
    run_kwargs = {"storage_path": train_dir.path if train_dir.remote else str(train_dir.local())}
    if train_dir.remote:
        run_kwargs["storage_filesystem"] = train_dir.fs
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=scaling_config(t),
        run_config=ray.train.RunConfig(
            name="ray", **run_kwargs,
            # Checkpoints are kept by raydistill (the latest train.keep_checkpoints and the best by
            # validation loss, checkpoints.prune), not by Ray's single ordering.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            # Worker crashes are retried from the latest checkpoint; config errors never reach
            # this point (checked above, or reported by the workers through error_file).
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets=datasets,
        # Every rank gets its own equal part of the train rows, in a fixed order (so a resumed run
        # skips exactly the micro-batches already trained); validation is read by the workers themselves.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    previous_handler = signal.getsignal(signal.SIGINT)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:  # Ray leaves its handler installed: a later Ctrl-C (in evaluate) must not reach it
        if threading.current_thread() is threading.main_thread() and previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    seconds = time.perf_counter() - t0
    if error_file.is_file():
        msg = json.loads(error_file.read_text())["error"]
        error_file.delete()
        raise ValueError(f"the workers could not set up the student from {student_ref}"
                         f"{' or the online teacher ' + teacher_ref if teacher_ref else ''} (a config error; "
                         f"not retried): {msg}")
    final = latest_checkpoint(ray_dir)
    stopped_early = bool(final and final[1].get("stopped_early"))  # train.early_stopping_patience
    if final is None or not final[1].get("final") or (final[1]["step"] != total and not stopped_early):
        raise RuntimeError(f"training ended without a final checkpoint in {ray_dir} (latest: "
                           f"{final[1] if final else None})")
    final_dir = final[0]
    history = json.loads((final_dir / HISTORY_FILE).read_text())
    (train_dir / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in history))
    plot_losses(history, train_dir / "loss.png", title=f"{t.loss} · {cfg.output_dir}")
    student_out = out / "student"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "student"
        if final_dir.remote:
            from .checkpoints import download

            download(final_dir / HF_SUBDIR, tmp)
        else:
            shutil.copytree(final_dir.local() / HF_SUBDIR, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "raydistill_config.yaml").write_text(cfg.dump())
        if student_out.remote:
            upload_dir(tmp, student_out)
        else:
            partial = student_out.local().with_name("student.partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(tmp, partial)
            shutil.rmtree(student_out.local(), ignore_errors=True)
            partial.rename(student_out.local())
    summary = {"steps": len(history), "examples": n_train, "validation_examples": n_val,
               "loss": t.loss, "kd": t.kd.model_dump() if t.loss == "logit_kd" else None,
               "label_source": source, "label_source_reason": why,
               "truncated_rows": truncated, "truncated_answers": t.truncated_answers,
               "truncated_action": "dropped" if t.truncated_answers == "drop" else
               "trained without an end-of-turn label",
               "dropped": dropped, "dropped_validation": counts["validation"]["dropped"],
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "val_loss": [r["val_loss"] for r in history if r.get("val_loss") is not None],
               "resumed_from_step": resumed_from, "export": t.export,  # loop.train_loop: last | best
               "exported_step": final[1].get("exported_step", final[1]["step"]),
               "stopped_early": stopped_early,
               "seconds": round(seconds, 1), "student": student_out.uri,
               "baseline_student": student_ref, "provenance": provenance()}
    (train_dir / "config.yaml").write_text(cfg.dump())
    (train_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if t.delete_checkpoints:
        ray_dir.delete()
        log.info("train: deleted the training checkpoints in %s (train.delete_checkpoints)", ray_dir)
    else:
        prune(ray_dir, t.keep_checkpoints)
    stage.finish()  # last: student/ and summary.json are complete
    log.info("train: loss %.4f -> %.4f over %d steps in %.0f s -> %s", summary["first_loss"],
             summary["last_loss"], len(history), seconds, student_out)
    return summary
