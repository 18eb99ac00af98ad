"""The train stage: Ray Train ``TorchTrainer`` fine-tunes the student on the teacher corpus.

This module is the driver: ``run_train`` in named phases (prepare the student, check the inputs,
resume or reset, tokenize and plan, fit, export and publish), the stage record (``train_stage``)
and what must match for a resume (``resume_key``). It reads no weights: the student is prepared by
``train.student``, trained by the workers (``train.worker`` running ``train.loop``).

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
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, TrainConfig
from ..storage import StoragePath
from .checkpoints import HF_SUBDIR, HISTORY_FILE, best_checkpoint, checkpoint_dirs, latest_checkpoint, prune
from .examples import COMPLETE, choose_label_source, example_counts, trained_rows, write_examples
from .plan import Plan, plan_steps, warmup_steps
from .student import Student, check_logit_kd, check_lora_targets, prepare_student
from .worker import WORKER_ERROR_FILE, WorkerSettings, train_loop_per_worker

log = logging.getLogger(__name__)


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


def train_stage(cfg: Config, manifest: dict):
    """The train stage's completion record (``raydistill.stages``; ``train/_stage.json``).

    Settings: the ``resume_key`` train settings plus the run length (``epochs``, ``max_steps``: a
    longer run is another student) but not ``cpus_per_worker`` (threads change nothing trained),
    the student and the teacher. Inputs: the corpus (its manifest's figures and the manifest
    file's size and mtime: a regenerated corpus is a new input) and, for ``init=pretrained`` with
    a local or ``s3://`` folder, that folder's files. Outputs: ``student/`` and ``train/summary.json``."""
    from ..corpus import MANIFEST
    from ..layout import corpus_location, student_location, train_location
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
    train_dir = train_location(cfg)
    return Stage("train", train_dir / RECORD, {"student": student_location(cfg), "summary": train_dir / "summary.json"},
                 settings={"train": train, "student": key["student"], "teacher": key["teacher"]}, inputs=inputs)


@dataclass
class Labels:
    """How the corpus becomes labels for this student (``check_inputs``): the student's
    ``tokenizer``, the ``source`` of the labels (``examples.TEACHER_IDS`` or ``RETOKENIZED``) and
    ``why``, and ``stop_ids``, the token ids that end an answer."""
    tokenizer: Any
    source: str
    why: str
    stop_ids: set[int]


@dataclass
class Examples:
    """The tokenized examples and the steps they make (``plan_run``): ``counts`` per split
    (``examples.example_counts``), the train rows left out per reason (``dropped``, with
    ``uneven_split``), and the step ``plan`` (``plan.Plan``)."""
    counts: dict[str, dict]
    dropped: dict[str, int]
    plan: Plan

    @property
    def n_train(self) -> int:
        return self.counts["train"]["rows"]

    @property
    def n_val(self) -> int:
        return self.counts["validation"]["rows"]


def check_inputs(cfg: Config, manifest: dict, student: Student) -> Labels:
    """Every refusal that needs no Ray Train, before anything of an earlier run is deleted: LoRA
    targets the student lacks (ModelError), a student without a chat template, logit KD that cannot
    work (``student.check_logit_kd``), MLflow asked for but not installed. Chooses the label source
    (the teacher's ids when the student has the teacher's token-id space, else the text tokenized
    again) and the stop ids (the corpus's, the student's chat template's and its end of sequence)."""
    from transformers import AutoTokenizer

    from ..chat import stop_token_ids
    from ..models import require_chat_template

    check_lora_targets(cfg, student.dir)
    tokenizer = AutoTokenizer.from_pretrained(student.dir)
    require_chat_template(tokenizer, str(student.dir))
    source, why = choose_label_source(tokenizer, manifest, cfg)
    log.info("train: labels are %s (%s)", source.replace("_", " "), why)
    check_logit_kd(cfg, manifest, tokenizer, student.dir, source, why)
    stop_ids = set(manifest.get("stop_token_ids") or []) | stop_token_ids(student.dir)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    if cfg.train.mlflow.enabled:
        from .observe import require_mlflow

        require_mlflow()
    return Labels(tokenizer, source, why, stop_ids)


def resume_or_reset(cfg: Config, manifest: dict, stage, student: Student, overwrite: bool) -> int | None:
    """Decide between resuming and starting afresh, and clear what does not carry over. An
    interrupted run (no summary.json yet) with the same settings (``resume_key``) resumes from its
    latest checkpoint; one whose settings or corpus changed, or any with --overwrite, starts afresh
    (a finished run was skipped or refused before). Only the training length (epochs, max_steps) and
    checkpoint keeping may change on resume. Either way the previous student and stage record are
    removed (they no longer describe this training) and ``train/resume_key.json`` and
    ``train/student_init.json`` are written. Returns the step resumed from, or None."""
    from ..layout import baseline_pruning, examples_location, ray_train_location, student_location, train_location

    train_dir = train_location(cfg)
    ray_dir = ray_train_location(cfg)
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
        for stale in [*(train_dir / name for name in ("summary.json", "metrics.jsonl", "loss.png")),
                      examples_location(cfg)]:
            stale.delete()
    key_file.write_text(json.dumps(key, indent=2))
    # The previous student no longer describes this training: never leave it for evaluate.
    stage.forget()
    student_location(cfg).delete()
    init = {"init": cfg.student.init, "baseline_student": student.ref, "teacher": cfg.teacher.model,
            "keep_layers": cfg.student.keep_layers}
    init.update(baseline_pruning(cfg) or {})  # the layers the pruning kept, and their scores
    (train_dir / "student_init.json").write_text(json.dumps(init, indent=2))
    return resumed_from


def plan_run(cfg: Config, manifest: dict, corpus: StoragePath, student: Student, labels: Labels,
             resumed_from: int | None) -> Examples:
    """Tokenize the corpus into ``train/examples/<split>/`` in Ray Data (a resumed run keeps the
    interrupted run's examples, in their order, so it skips exactly what it trained) and plan the
    steps. Raises ValueError when no train row is usable or fits ``train.max_seq_len``, when the
    rows cannot feed every worker, or when a resumed run already trained past this run's length."""
    from ..layout import examples_location, ray_train_location
    from ..runtime import init_ray

    t = cfg.train
    init_ray()
    with_topk = t.loss == "logit_kd" and t.kd.teacher == "corpus"
    data_files = [(corpus / f).path for f in manifest.get("shards", [])]
    counts = {}
    for split in ("train", "validation"):
        folder = examples_location(cfg, split)
        if resumed_from is not None and (folder / COMPLETE).is_file():
            # the interrupted run's examples, in their order: the resumed run skips exactly what it trained
            counts[split] = example_counts(folder)
            continue
        counts[split] = write_examples(data_files, corpus.fs, split, folder, tokenizer_dir=student.ref, cfg=cfg,
                                       source=labels.source, stop_ids=labels.stop_ids, with_topk=with_topk,
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
    _log_dropped("train", dropped, cfg)
    _log_dropped("validation", counts["validation"]["dropped"], cfg)
    total = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    if resumed_from is not None and resumed_from > total:
        raise ValueError(f"the interrupted run already trained {resumed_from} steps, past this run's length of "
                         f"{total} steps (train.epochs={t.epochs}, train.max_steps={t.max_steps}): raise them to "
                         f"continue it, or delete {ray_train_location(cfg)} to start afresh")
    plan = Plan(total_steps=total, warmup_steps=warmup_steps(total, t.warmup_ratio), steps_per_epoch=steps_per_epoch,
                micro_per_epoch=micro_per_epoch, vocab=len(labels.tokenizer),
                has_validation=bool(n_val))  # read whole by every rank, with pyarrow (examples.read_trained_rows)
    return Examples(counts, dropped, plan)


def fit(cfg: Config, student: Student, labels: Labels, examples: Examples) -> float:
    """Run Ray Train: ``train.workers`` workers (``scaling_config``) each run
    ``worker.train_loop_per_worker`` with the one ``WorkerSettings`` built here, on their equal
    part of the train examples, checkpointing into ``train/ray/``. Ctrl-C raises KeyboardInterrupt
    (checkpoints kept); a config error a worker reports raises ValueError (not retried). Returns
    the seconds ``fit`` took."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions

    from ..layout import examples_location, output_location, ray_train_location, train_location
    from ..models import resolve_model

    t = cfg.train
    train_dir = train_location(cfg)
    ray_dir = ray_train_location(cfg)
    error_file = train_dir / WORKER_ERROR_FILE
    error_file.delete()
    tokenizer = labels.tokenizer
    teacher_ref = str(resolve_model(cfg.teacher.model)) if t.loss == "logit_kd" and t.kd.teacher == "online" else None
    settings = WorkerSettings(
        train=t, storage=cfg.storage, student=student.ref, teacher=teacher_ref, plan=examples.plan,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        validation_dir=examples_location(cfg, "validation").uri, ray_dir=ray_dir.uri, error_file=error_file.uri,
        run_name=f"raydistill {t.loss} {output_location(cfg).uri}", params=cfg.model_dump(mode="json"),
        mlflow=_mlflow_settings(t, train_dir))
    plan = examples.plan
    log.info("train: %d examples, %d workers x batch %d x %d accumulation, %d steps (%d/epoch), loss %s%s",
             examples.n_train, t.workers, t.batch_size, t.grad_accum_steps, plan.total_steps, plan.steps_per_epoch,
             t.loss, f" ({t.kd.divergence}, T={t.kd.temperature}, alpha={t.kd.alpha}, teacher {t.kd.teacher})"
             if t.loss == "logit_kd" else "")
    run_kwargs = {"storage_path": train_dir.path if train_dir.remote else str(train_dir.local())}
    if train_dir.remote:
        run_kwargs["storage_filesystem"] = train_dir.fs
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=scaling_config(t),
        run_config=ray.train.RunConfig(
            name=ray_dir.name, **run_kwargs,  # Ray Train's run folder: train/ray/
            # Checkpoints are kept by raydistill (the latest train.keep_checkpoints and the best by
            # validation loss, checkpoints.prune), not by Ray's single ordering.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            # Worker crashes are retried from the latest checkpoint; config errors never reach
            # this point (checked above, or reported by the workers through error_file).
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets={"train": _examples_dataset(examples_location(cfg, "train"))},
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
        raise ValueError(f"the workers could not set up the student from {student.ref}"
                         f"{' or the online teacher ' + teacher_ref if teacher_ref else ''} (a config error; "
                         f"not retried): {msg}")
    return seconds


def export(cfg: Config, stage, student: Student, labels: Labels, examples: Examples, resumed_from: int | None,
           seconds: float) -> dict:
    """Publish what training made: check that it ended with its final checkpoint (RuntimeError
    otherwise), write ``train/metrics.jsonl`` and ``loss.png``, publish the exported checkpoint's
    student with the tokenizer and config as ``student/`` (``storage.publish_folder``), write
    ``train/config.yaml`` and ``train/summary.json``, delete or prune the checkpoints, and record the
    stage as finished, last. Returns the summary."""
    import tempfile

    from ..layout import ray_train_location, student_location, train_location
    from ..runtime import provenance
    from ..storage import publish_folder
    from .observe import plot_losses

    t = cfg.train
    train_dir = train_location(cfg)
    ray_dir = ray_train_location(cfg)
    total = examples.plan.total_steps
    final = latest_checkpoint(ray_dir)
    stopped_early = bool(final and final[1].get("stopped_early"))  # train.early_stopping_patience
    if final is None or not final[1].get("final") or (final[1]["step"] != total and not stopped_early):
        raise RuntimeError(f"training ended without a final checkpoint in {ray_dir} (latest: "
                           f"{final[1] if final else None})")
    final_dir = final[0]
    history = json.loads((final_dir / HISTORY_FILE).read_text())
    (train_dir / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in history))
    plot_losses(history, train_dir / "loss.png", title=f"{t.loss} · {cfg.output_dir}")
    student_out = student_location(cfg)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / student_out.name
        if final_dir.remote:
            from .checkpoints import download

            download(final_dir / HF_SUBDIR, tmp)
        else:
            shutil.copytree(final_dir.local() / HF_SUBDIR, tmp)
        labels.tokenizer.save_pretrained(tmp)
        (tmp / "raydistill_config.yaml").write_text(cfg.dump())
        publish_folder(tmp, student_out)
    counts = examples.counts
    summary = {"steps": len(history), "examples": examples.n_train, "validation_examples": examples.n_val,
               "loss": t.loss, "kd": t.kd.model_dump() if t.loss == "logit_kd" else None,
               "label_source": labels.source, "label_source_reason": labels.why,
               "truncated_rows": counts["train"]["truncated"], "truncated_answers": t.truncated_answers,
               "truncated_action": "dropped" if t.truncated_answers == "drop" else
               "trained without an end-of-turn label",
               "dropped": examples.dropped, "dropped_validation": counts["validation"]["dropped"],
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "val_loss": [r["val_loss"] for r in history if r.get("val_loss") is not None],
               "resumed_from_step": resumed_from, "export": t.export,  # loop.train_loop: last | best
               "exported_step": final[1].get("exported_step", final[1]["step"]),
               "stopped_early": stopped_early,
               "seconds": round(seconds, 1), "student": student_out.uri,
               "baseline_student": student.ref, "provenance": provenance()}
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

    The phases: prepare the student (``student.prepare_student``) → check the inputs
    (``check_inputs``) → resume or reset (``resume_or_reset``) → tokenize and plan (``plan_run``) →
    fit (``fit``) → export and publish (``export``).
    """
    from ..corpus import read_manifest
    from ..layout import corpus_location, train_location

    corpus = corpus_location(cfg)
    manifest = read_manifest(corpus)
    stage = train_stage(cfg, manifest)
    if stage.done(overwrite):
        return json.loads((train_location(cfg) / "summary.json").read_text())
    train_location(cfg).mkdir()
    student = prepare_student(cfg)
    labels = check_inputs(cfg, manifest, student)
    # Every refusal above comes before anything of an earlier run is deleted.
    resumed_from = resume_or_reset(cfg, manifest, stage, student, overwrite)
    examples = plan_run(cfg, manifest, corpus, student, labels, resumed_from)
    seconds = fit(cfg, student, labels, examples)
    return export(cfg, stage, student, labels, examples, resumed_from, seconds)


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
