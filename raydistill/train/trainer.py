"""The train stage: Ray Train ``TorchTrainer`` fine-tunes the student on the teacher corpus.

Layout under ``output_dir``:
- ``baseline_student/``: the student before training (init=prune writes it; init=pretrained
  records the model reference in ``train/student_init.json`` instead);
- ``train/ray/``: Ray Train's run folder with its checkpoints: ``raydistill train`` after an
  interrupted run with unchanged settings (``train/resume_key.json``) resumes from the latest
  one; after a finished run, or with other settings or another corpus, it starts afresh;
- ``train/metrics.jsonl``: one JSON object per optimizer step (loss, lr, grad_norm, tokens,
  seconds; ``val_loss`` on the last step of each epoch when the corpus has validation rows);
- ``student/``: the final student, ``save_pretrained`` format (LoRA merged), with tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import Config
from .losses import IGNORE_INDEX, sequence_kd_loss

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HF_SUBDIR = "hf"


def tokenize_example(tokenizer, messages: list[dict], response: str, max_len: int) -> dict[str, list[int]] | None:
    """Chat-format one (prompt, teacher response) pair for sequence KD.

    Returns ``input_ids`` and ``labels`` (same length ≤ max_len) where prompt tokens carry -100
    and response tokens, including the chat template's end-of-turn token (EOS for SmolLM2),
    carry their ids. Returns None when the prompt alone fills ``max_len`` (nothing to learn).
    """
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=False)
    if full_text.startswith(prompt_text):
        completion = full_text[len(prompt_text):]
    else:  # a template that rewrites earlier turns: fall back to response + EOS
        completion = response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_len - 1:
        return None
    ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Right-pad ragged ``input_ids``/``labels`` into (batch, seq) tensors.

    Padding gets ``pad_id`` in input_ids, -100 in labels and 0 in attention_mask — masked by
    position, never by token id, so an EOS equal to the pad token stays in the labels.
    """
    import torch

    seqs = [list(x) for x in batch["input_ids"]]
    labs = [list(x) for x in batch["labels"]]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _pad_collate(pad_id: int):
    """``collate`` as a Ray Data collate class (plain functions are deprecated since Ray 2.47)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PadCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch, pad_id)

    return PadCollate()


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 0 at ``total`` (a multiplier)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resume_key(cfg: Config, manifest: dict) -> dict:
    """What must be unchanged for an interrupted run to resume: the train settings except its
    length, the student, the teacher and the corpus (rows, tokens, generation settings)."""
    train = cfg.train.model_dump(exclude={"epochs", "max_steps", "checkpoint_every_steps"})
    corpus = {k: manifest.get(k) for k in ("rows", "response_tokens", "teacher", "generation_params")}
    return {"train": train, "student": cfg.student.model_dump(), "teacher": cfg.teacher.model, "corpus": corpus}


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """Ray Train worker loop (one per rank). ``c`` carries the plain settings built by run_train."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import TrainConfig

    t: TrainConfig = TrainConfig.model_validate(c["train"])
    torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))  # Ray leaves a worker 1 thread
    torch.manual_seed(t.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    model = AutoModelForCausalLM.from_pretrained(c["student_dir"], dtype=torch.float32)
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    model = ray.train.torch.prepare_model(model, parallel_strategy=t.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    total, warmup = c["total_steps"], c["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warmup))

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        if rank == 0:
            print(f"[raydistill] resumed from checkpoint at step {step}", flush=True)

    def save_state(final: bool) -> None:
        metrics = history[-1] if history else {"step": step}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save({"model": unwrapped.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step, "history": history},
                           Path(d) / STATE_FILE)
                if final:
                    export = unwrapped.merge_and_unload() if t.lora.enabled else unwrapped
                    export.save_pretrained(Path(d) / HF_SUBDIR)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, "final": final}, checkpoint=checkpoint)

    pad_collate = _pad_collate(c["pad_id"])

    def validation_loss() -> float:
        """Token-mean sequence-KD loss on the validation shards of all ranks (teacher answers
        to validation prompts, never trained on)."""
        model.eval()
        stats = torch.zeros(2)
        with torch.no_grad():
            for vb in ray.train.get_dataset_shard("validation").iter_torch_batches(
                    batch_size=t.batch_size, collate_fn=pad_collate):
                out = model(input_ids=vb["input_ids"], attention_mask=vb["attention_mask"]).logits
                loss, n = sequence_kd_loss(out, vb["labels"])
                stats += torch.stack([loss.float() * n, n.float()])
        if world > 1:
            torch.distributed.all_reduce(stats)
        model.train()
        return round(float(stats[0] / stats[1].clamp(min=1)), 6)

    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = c["steps_per_epoch"]
    every = t.checkpoint_every_steps
    model.train()
    t_start = time.perf_counter()
    while step < total:
        epoch = step // steps_per_epoch
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained before a resume
        trained = 0
        for i, batch in enumerate(shard.iter_torch_batches(
                batch_size=t.batch_size, collate_fn=pad_collate,
                local_shuffle_buffer_size=None)):
            if i < skip:
                continue
            t0 = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n_tok = sequence_kd_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            lr = sched.get_last_lr()[0]  # the rate this step uses
            opt.step()
            sched.step()
            step += 1
            trained += 1
            stats = torch.tensor([loss.detach().float() * n_tok, n_tok.float()])
            if world > 1:
                torch.distributed.all_reduce(stats)
            rec = {"step": step, "epoch": epoch, "loss": round(float(stats[0] / stats[1].clamp(min=1)), 6),
                   "lr": lr, "grad_norm": round(float(grad_norm), 4),
                   "tokens": int(stats[1]), "seconds": round(time.perf_counter() - t0, 3)}
            history.append(rec)
            if rank == 0:
                eta = (time.perf_counter() - t_start) / max(1, len(history)) * (total - step)
                print(f"[raydistill] step {step}/{total} epoch {epoch} loss {rec['loss']:.4f} "
                      f"lr {rec['lr']:.2e} {rec['seconds']:.1f}s/step eta {eta:.0f}s", flush=True)
            end_of_epoch = step >= total or step % steps_per_epoch == 0
            if end_of_epoch and c["has_validation"]:
                rec["val_loss"] = validation_loss()
                if rank == 0:
                    print(f"[raydistill] epoch {epoch} validation loss {rec['val_loss']:.4f}", flush=True)
            if step >= total:
                break
            if every and step % every == 0:
                save_state(final=False)
        if trained == 0:
            raise RuntimeError(f"rank {rank}: the train shard yielded no batch for epoch {epoch} "
                               f"(expected {steps_per_epoch}, {skip} already done)")
        if not every and step < total:
            save_state(final=False)  # epoch boundary
    save_state(final=True)


def run_train(cfg: Config) -> dict:
    """Train the student on ``corpus/`` (split=train) and write ``student/`` + ``train/metrics.jsonl``.

    Raises FileNotFoundError without a finished corpus, ValueError when no example fits
    ``train.max_seq_len``. Returns a summary (steps, first/last loss, seconds, student path).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from ..corpus import read_corpus
    from ..layout import corpus_dir
    from ..models import prune_student, require_chat_template, resolve_model
    from ..runtime import init_ray, provenance

    out = Path(cfg.output_dir).resolve()
    corpus, manifest = read_corpus(corpus_dir(cfg))
    # Failed rows carry no answer; an empty answer is kept: it still teaches the student to stop.
    usable = [r for r in corpus.select(["split", "messages", "response", "error"]).to_pylist() if not r["error"]]
    rows = [r for r in usable if r["split"] == "train"]
    if not rows:
        raise ValueError(f"the corpus at {corpus_dir(cfg)} has no usable train rows")

    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    # Ray Train restores a run from the checkpoints in its folder. An interrupted run (no
    # summary.json yet) with the same settings resumes from its latest checkpoint; a finished
    # run, or one whose settings or corpus changed, starts afresh. Only the training length
    # (epochs, max_steps) may change on resume: it extends or caps the run.
    key = resume_key(cfg, manifest)
    key_file = train_dir / "resume_key.json"
    checkpoints = list((train_dir / "ray").glob("checkpoint_*"))
    previous_key = json.loads(key_file.read_text()) if key_file.is_file() else None
    if checkpoints and not (train_dir / "summary.json").is_file() and previous_key == key:
        log.info("train: resuming an interrupted run from its latest checkpoint in %s", train_dir / "ray")
    else:
        if checkpoints and not (train_dir / "summary.json").is_file():
            log.warning("train: settings or corpus changed since the interrupted run; starting afresh")
        shutil.rmtree(train_dir / "ray", ignore_errors=True)
        for stale in ("summary.json", "metrics.jsonl"):
            (train_dir / stale).unlink(missing_ok=True)
    key_file.write_text(json.dumps(key, indent=2))
    # The previous student no longer describes this training: never leave it for evaluate.
    shutil.rmtree(out / "student", ignore_errors=True)
    if cfg.student.init == "prune":
        student_dir = out / "baseline_student"
        if not (student_dir / "config.json").is_file():
            tmp = out / "baseline_student.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            keep = prune_student(resolve_model(cfg.teacher.model), cfg.student.keep_layers, tmp)
            tmp.rename(student_dir)
            log.info("train: pruned student keeps teacher layers %s -> %s", keep, student_dir)
    else:
        student_dir = Path(resolve_model(cfg.student.model))
    (train_dir / "student_init.json").write_text(json.dumps(
        {"init": cfg.student.init, "baseline_student": str(student_dir), "teacher": cfg.teacher.model,
         "keep_layers": cfg.student.keep_layers}, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    require_chat_template(tokenizer, str(student_dir))
    def examples_of(split: str) -> list[dict]:
        out = (tokenize_example(tokenizer, r["messages"], r["response"], cfg.train.max_seq_len)
               for r in usable if r["split"] == split)
        return [ex for ex in out if ex is not None]

    examples, val_examples = examples_of("train"), examples_of("validation")
    dropped = len(rows) - len(examples)
    if not examples:
        raise ValueError(f"no train example fits train.max_seq_len={cfg.train.max_seq_len} tokens")
    if dropped:
        log.warning("train: %d prompt(s) longer than train.max_seq_len=%d tokens skipped", dropped,
                    cfg.train.max_seq_len)
    t = cfg.train
    per_worker = len(examples) // t.workers
    if per_worker == 0:
        raise ValueError(f"{len(examples)} train examples cannot feed {t.workers} workers")
    steps_per_epoch = math.ceil(per_worker / t.batch_size)
    total = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    init_ray()
    datasets = {"train": ray.data.from_items(examples)}
    # Each rank needs at least one validation row (the shards are split equally).
    has_validation = len(val_examples) >= t.workers
    if has_validation:
        datasets["validation"] = ray.data.from_items(val_examples)
    loop_cfg = {"train": t.model_dump(), "student_dir": str(student_dir), "total_steps": total,
                "warmup_steps": int(t.warmup_ratio * total), "steps_per_epoch": steps_per_epoch,
                "pad_id": pad_id, "has_validation": has_validation}
    log.info("train: %d examples, %d workers x batch %d, %d steps (%d/epoch)", len(examples), t.workers,
             t.batch_size, total, steps_per_epoch)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=str(train_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=2)),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    final = Path(result.checkpoint.path)
    state_path = final / STATE_FILE
    import torch

    history = torch.load(state_path, map_location="cpu", weights_only=False)["history"]
    with (train_dir / "metrics.jsonl").open("w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    student_out = out / "student"
    tmp = out / "student.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final / HF_SUBDIR, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "raydistill_config.yaml").write_text(cfg.dump())
    shutil.rmtree(student_out, ignore_errors=True)
    tmp.rename(student_out)
    summary = {"steps": len(history), "examples": len(examples), "skipped_too_long": dropped,
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "val_loss": [r["val_loss"] for r in history if r.get("val_loss") is not None],
               "seconds": round(seconds, 1), "student": str(student_out),
               "baseline_student": str(student_dir), "provenance": provenance()}
    (train_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("train: loss %.4f -> %.4f over %d steps in %.0f s -> %s", summary["first_loss"],
             summary["last_loss"], len(history), seconds, student_out)
    return summary
