"""The train stage: Ray Train ``TorchTrainer`` fine-tunes the student on the teacher corpus.

Layout under ``output_dir``:
- ``baseline_student/``: the student before training (init=prune writes it, with
  ``raydistill_student_init.json``: the teacher and layers it was made from; it is rebuilt when
  they change; init=pretrained records the model reference in ``train/student_init.json`` instead);
- ``train/ray/``: Ray Train's run folder with its checkpoints (``train.keep_checkpoints`` kept while
  training; all deleted once the student is exported unless ``train.delete_checkpoints`` is false).
  ``raydistill train`` after an interrupted run with unchanged settings (``train/resume_key.json``)
  resumes from the latest complete checkpoint written there; after a finished run, or with other
  settings or another corpus, it starts afresh;
- ``train/metrics.jsonl``: one JSON object per optimizer step (loss, lr, grad_norm, tokens,
  seconds; ``val_loss`` on the last step of each epoch when the corpus has validation rows);
- ``train/summary.json``: steps, losses, which labels were trained (``label_source``), truncated
  answers and every row left out, per reason (``dropped``);
- ``student/``: the final student, ``save_pretrained`` format (LoRA merged), with tokenizer.

What the student learns is what the teacher said: when the student's tokenizer has the teacher's
token-id space, the labels are the teacher's own ``response_token_ids``; otherwise the answer
text is tokenized again. A finished answer ends with the chat template's end of turn (e.g.
``<|im_end|>\\n``); an answer cut at the token limit (finish_reason ``length``) gets no end of
turn (``train.truncated_answers: keep``) or is left out (``drop``).
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

from ..config import Config
from .losses import IGNORE_INDEX, sequence_kd_loss

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HF_SUBDIR = "hf"
META_FILE = "raydistill_checkpoint.json"  # written last into a checkpoint: step and file sizes
BASELINE_RECIPE = "raydistill_student_init.json"  # in baseline_student/: what it was made from
WORKER_ERROR_FILE = "worker_config_error.json"
TEACHER_IDS, RETOKENIZED = "teacher_token_ids", "retokenized_text"


def build_example(tokenizer, messages: list[dict], response: str, finish_reason: str,
                  response_ids: list[int] | None, max_len: int, *, eot_ids: list[int],
                  stop_ids: set[int] = frozenset()) -> dict[str, list[int]] | None:
    """Chat-format one (prompt, teacher answer) pair for sequence KD.

    Args:
        tokenizer: the student's tokenizer (with a chat template).
        messages: the prompt's chat messages.
        response: the teacher's answer text; used when ``response_ids`` is None.
        finish_reason: ``stop`` (the answer ended by itself) or ``length`` (cut at the token limit).
        response_ids: the teacher's own generated ids (same token-id space as ``tokenizer``), or
            None to tokenize ``response`` again (``chat.text_ids``: special-token spellings stay text).
        max_len: tokens kept (prompt + answer), cut from the right.
        eot_ids: what the template writes after an answer (``chat.end_of_turn_ids``).
        stop_ids: ids that ended generation; a trailing one in ``response_ids`` is replaced by ``eot_ids``.
    Returns:
        ``input_ids`` and ``labels`` (same length ≤ max_len): prompt ids (``chat.prompt_ids``) carry
        -100, answer ids carry their ids. A ``stop`` answer ends with ``eot_ids``; a ``length``
        answer ends with its last token (no end of turn: the student must not learn to stop
        there). None when the prompt alone fills ``max_len`` (nothing to learn).
    """
    from ..chat import prompt_ids, text_ids

    prompt = prompt_ids(tokenizer, messages)
    if len(prompt) >= max_len - 1:
        return None
    if response_ids is not None:
        answer = list(response_ids)
        if finish_reason == "stop" and answer and answer[-1] in stop_ids:
            answer = answer[:-1]
    else:
        answer = text_ids(tokenizer, response)
    if finish_reason == "stop":
        answer += list(eot_ids)
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
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


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 0 at ``total`` (a multiplier of
    the peak rate for the 0-based optimizer ``step``). A pure function of (step, total, warmup):
    a run resumed with another length follows the schedule of the new length from the resume
    step on, exactly as an uninterrupted run of that length would."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * total)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch): a new order every epoch,
    the same order for a resumed run as for an uninterrupted one."""
    import numpy as np

    return np.random.default_rng([seed % 2**63, epoch]).permutation(n).tolist()


def rank_batches(order: list[int], world: int, rank: int, batch_size: int) -> list[list[int]]:
    """Rank ``rank``'s batches (example indices) for one epoch: ``order`` is cut into ``world``
    equal parts (the last ``len(order) % world`` indices are left out this epoch, so every rank
    takes the same number of steps), and the rank's part into batches of ``batch_size``."""
    per = len(order) // world
    mine = order[rank * per:(rank + 1) * per]
    return [mine[i:i + batch_size] for i in range(0, per, batch_size)]


def latest_checkpoint(ray_dir: Path) -> tuple[Path, dict] | None:
    """The complete checkpoint with the highest step under ``ray_dir`` (Ray Train's run folder),
    as (folder, its ``META_FILE`` contents), or None.

    A checkpoint is complete when its meta file is there and every file it lists has the listed
    size. The folder is scanned rather than Ray's own record: Ray registers a checkpoint only when
    its controller next polls the workers, so a run interrupted between the upload and that poll
    would otherwise resume one checkpoint early and redo a step.
    """
    best: tuple[tuple, Path, dict] | None = None
    for d in checkpoint_dirs(ray_dir):
        meta_file = d / META_FILE
        try:
            meta = json.loads(meta_file.read_text())
            complete = all((d / rel).is_file() and (d / rel).stat().st_size == size
                           for rel, size in meta["files"].items())
        except (OSError, ValueError, KeyError):
            continue
        if complete:
            key = (meta["step"], bool(meta.get("final")), d.name)
            if best is None or key > best[0]:
                best = (key, d, meta)
    return (best[1], best[2]) if best else None


def checkpoint_dirs(ray_dir: Path) -> list[Path]:
    """The checkpoint folders in Ray Train's run folder (not its checkpoint_manager_snapshot.json)."""
    return [d for d in Path(ray_dir).glob("checkpoint_*") if d.is_dir()]


def checkpoint_step(folder: Path) -> int:
    """The step recorded in one checkpoint folder (-1 when it has no readable record)."""
    try:
        return int(json.loads((Path(folder) / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _write_meta(folder: Path, step: int, final: bool) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / META_FILE).write_text(json.dumps({"step": step, "final": final, "files": files}))


def resume_key(cfg: Config, manifest: dict) -> dict:
    """What must be unchanged for an interrupted run to resume: the train settings except its
    length and checkpoint keeping, the student, the teacher and the corpus (rows, tokens,
    generation settings, tokenizer)."""
    train = cfg.train.model_dump(exclude={"epochs", "max_steps", "checkpoint_every_steps", "keep_checkpoints",
                                          "delete_checkpoints"})
    corpus = {k: manifest.get(k) for k in ("rows", "response_tokens", "teacher", "generation_params",
                                           "teacher_tokenizer")}
    return {"train": train, "student": cfg.student.model_dump(), "teacher": cfg.teacher.model, "corpus": corpus}


def baseline_recipe(teacher_ref: str, teacher_dir: str, keep_layers: list[int] | None) -> dict:
    """What a pruned baseline student is made from: the teacher reference, the names and sizes of
    its weight files (a local folder whose weights changed makes another student), and
    ``student.keep_layers`` as configured (None = the default choice)."""
    from ..models import _WEIGHT_SUFFIXES

    folder = Path(teacher_dir)
    files = ({f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name.endswith(_WEIGHT_SUFFIXES)}
             if folder.is_dir() else None)
    return {"teacher": teacher_ref, "teacher_weights": files, "keep_layers": keep_layers}


def _ensure_baseline(cfg: Config, out: Path) -> Path:
    """``baseline_student/`` for init=prune, (re)built when what made it differs from now."""
    from ..layout import pruned_baseline_dir
    from ..models import prune_student, resolve_model

    student_dir = pruned_baseline_dir(cfg)
    teacher_dir = resolve_model(cfg.teacher.model)
    recipe = baseline_recipe(cfg.teacher.model, teacher_dir, cfg.student.keep_layers)
    recipe_file = student_dir / BASELINE_RECIPE
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    if (student_dir / "config.json").is_file() and previous is not None and \
            {k: previous.get(k) for k in recipe} == recipe:
        return student_dir
    if (student_dir / "config.json").is_file():
        changed = [k for k in recipe if previous is None or previous.get(k) != recipe[k]]
        log.warning("train: rebuilding %s: it was made from another %s", student_dir,
                    " and ".join(changed) if previous else "recipe (no record of what made it)")
    tmp = out / "baseline_student.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    keep = prune_student(teacher_dir, cfg.student.keep_layers, tmp)
    (tmp / BASELINE_RECIPE).write_text(json.dumps(dict(recipe, kept=keep), indent=2))
    shutil.rmtree(student_dir, ignore_errors=True)
    tmp.rename(student_dir)
    log.info("train: pruned student keeps teacher layers %s -> %s", keep, student_dir)
    return student_dir


def check_lora_targets(cfg: Config, student_dir: Path) -> None:
    """Raise ModelError when ``train.lora.target_modules`` names a module the student lacks
    (checked on the meta device: no weight is read)."""
    from ..models import ModelError, lora_target_problem, meta_model

    if not cfg.train.lora.enabled:
        return
    problem = lora_target_problem(meta_model(student_dir / "config.json"), cfg.train.lora.target_modules)
    if problem:
        raise ModelError(f"train.lora.target_modules: {problem}")


def choose_label_source(student_tokenizer, manifest: dict, corpus_teachers: set[str], cfg: Config) -> tuple[str, str]:
    """(``teacher_token_ids`` or ``retokenized_text``, why): the teacher's own ids are trained when
    the student's tokenizer has the teacher's token-id space (``chat.tokenizer_fingerprint``
    equal to the corpus manifest's ``teacher_tokenizer``). A corpus without that record is checked
    against ``teacher.model``'s tokenizer when it made the corpus and is at hand locally."""
    from ..chat import tokenizer_fingerprint
    from ..models import config_json

    student_fp = tokenizer_fingerprint(student_tokenizer)
    teacher_fp = manifest.get("teacher_tokenizer")
    if teacher_fp is None and corpus_teachers == {cfg.teacher.model}:
        cfg_file = config_json(cfg.teacher.model)
        if cfg_file is not None and cfg_file.parent.joinpath("tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            teacher_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg_file.parent))
    if teacher_fp is None:
        return RETOKENIZED, "the corpus does not record the teacher's tokenizer"
    if teacher_fp != student_fp:
        return RETOKENIZED, "the student's tokenizer differs from the teacher's"
    return TEACHER_IDS, "the student shares the teacher's tokenizer"


def _examples(rows: list[dict], tokenizer, cfg: Config, source: str, stop_ids: set[int]) -> tuple[list[dict], dict]:
    """Build the examples of ``rows`` (one split); returns (examples, rows left out per reason)."""
    from ..chat import end_of_turn_ids

    dropped = {"error": 0, "truncated": 0, "too_long": 0}
    examples = []
    for r in rows:
        if r["error"] or r["finish_reason"] == "error":
            dropped["error"] += 1
            continue
        truncated = r["finish_reason"] == "length"
        if truncated and cfg.train.truncated_answers == "drop":
            dropped["truncated"] += 1
            continue
        ids = r["response_token_ids"]
        # A row whose ids were not kept (an empty list for a non-empty answer) is tokenized from text.
        use_ids = source == TEACHER_IDS and (ids or not r["response"])
        ex = build_example(tokenizer, r["messages"], r["response"], "length" if truncated else "stop",
                           list(ids or []) if use_ids else None, cfg.train.max_seq_len,
                           eot_ids=end_of_turn_ids(tokenizer, r["messages"]), stop_ids=stop_ids)
        if ex is None:
            dropped["too_long"] += 1
            continue
        examples.append(dict(ex, idx=len(examples)))
    return examples, dropped


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """Ray Train worker loop (one per rank). ``c`` carries the plain settings built by run_train."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import TrainConfig
    from ..models import ModelError

    t: TrainConfig = TrainConfig.model_validate(c["train"])
    torch.set_num_threads(max(1, math.ceil(t.cpus_per_worker)))  # Ray leaves a worker 1 thread
    torch.manual_seed(t.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    try:
        model = AutoModelForCausalLM.from_pretrained(c["student_dir"], dtype=torch.float32)
        if t.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                     target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    except (ValueError, ModelError) as e:
        # A config error repeats on every retry: report it to the driver through a file and end
        # normally, so that Ray Train's failure policy (which retries every worker error) does not.
        if rank == 0:
            Path(c["error_file"]).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    model = ray.train.torch.prepare_model(model, parallel_strategy=t.strategy)
    unwrapped = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    total, warmup = c["total_steps"], c["warmup_steps"]

    step, history = 0, []
    found = latest_checkpoint(Path(c["ray_dir"]))
    if found is not None:
        state = torch.load(found[0] / STATE_FILE, map_location="cpu", weights_only=False)
        unwrapped.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        if rank == 0:
            print(f"[raydistill] resumed from checkpoint at step {step} ({found[0].name})", flush=True)

    def save_state(final: bool) -> None:
        metrics = history[-1] if history else {"step": step}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": unwrapped.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "history": history}, Path(d) / STATE_FILE)
                if final:
                    export = unwrapped.merge_and_unload() if t.lora.enabled else unwrapped
                    export.save_pretrained(Path(d) / HF_SUBDIR)
                _write_meta(Path(d), step, final)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, "final": final}, checkpoint=checkpoint)

    def load_rows(name: str) -> list[dict]:
        """Every row of a dataset (each worker reads all of it), in the driver's order."""
        rows = [{"idx": int(r["idx"]), "input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
                for r in ray.train.get_dataset_shard(name).iter_rows()]
        return sorted(rows, key=lambda r: r["idx"])

    def as_batch(rows: list[dict]) -> dict[str, Any]:
        return collate({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
                       c["pad_id"])

    train_rows = load_rows("train")
    val_rows = load_rows("validation")[rank::world] if c["has_validation"] else []

    def validation_loss() -> float:
        """Token-mean sequence-KD loss over every validation row (each rank scores every
        world-th row; none is left out), teacher answers to prompts never trained on."""
        model.eval()
        stats = torch.zeros(2)
        with torch.no_grad():
            for i in range(0, len(val_rows), t.batch_size):
                vb = as_batch(val_rows[i:i + t.batch_size])
                # the unwrapped module: ranks may score different numbers of batches (no DDP collective)
                out = unwrapped(input_ids=vb["input_ids"], attention_mask=vb["attention_mask"]).logits
                loss, n = sequence_kd_loss(out, vb["labels"])
                stats += torch.stack([loss.float() * n, n.float()])
        if world > 1:
            torch.distributed.all_reduce(stats)
        model.train()
        return round(float(stats[0] / stats[1].clamp(min=1)), 6)

    steps_per_epoch = c["steps_per_epoch"]
    every = t.checkpoint_every_steps
    model.train()
    t_start = time.perf_counter()
    while step < total:
        epoch = step // steps_per_epoch
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained before a resume
        batches = rank_batches(epoch_order(len(train_rows), t.seed, epoch), world, rank, t.batch_size)
        for i in range(skip, len(batches)):
            batch = as_batch([train_rows[j] for j in batches[i]])
            t0 = time.perf_counter()
            lr = t.lr * lr_lambda(step, total, warmup)  # the rate of this step, never a restored state
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n_tok = sequence_kd_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            step += 1
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
        if not every and step < total:
            save_state(final=False)  # epoch boundary
    save_state(final=True)


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
    why = {"error": "failed in generation (error rows)",
           "truncated": "truncated answers (train.truncated_answers=drop)",
           "too_long": f"prompt longer than train.max_seq_len={cfg.train.max_seq_len} tokens",
           "uneven_split": f"left out each epoch by the equal split over train.workers={cfg.train.workers} "
                           "(other rows each epoch: the order is reshuffled)"}
    for reason, n in dropped.items():
        if n:
            log.warning("train: %d %s row(s) left out: %s", n, split, why[reason])


def run_train(cfg: Config) -> dict:
    """Train the student on ``corpus/`` (split=train) and write ``student/`` + ``train/``.

    Raises FileNotFoundError without a finished corpus, ModelError for a student that cannot be
    built or LoRA targets it lacks (checked before Ray starts), ValueError when no example fits
    ``train.max_seq_len`` or a config error surfaces on the workers (never retried), and
    KeyboardInterrupt on Ctrl-C (checkpoints kept: the next run resumes). Returns the summary
    written to ``train/summary.json``.
    """
    import ray
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from ..chat import stop_token_ids
    from ..corpus import read_corpus
    from ..layout import corpus_dir, student_dir as student_out_dir, train_dir as train_out_dir
    from ..models import require_chat_template, resolve_model
    from ..runtime import init_ray, provenance

    out = Path(cfg.output_dir).resolve()
    corpus, manifest = read_corpus(corpus_dir(cfg))
    cols = ["split", "messages", "response", "response_token_ids", "finish_reason", "error", "teacher"]
    table_rows = corpus.select(cols).to_pylist()
    rows = {s: [r for r in table_rows if r["split"] == s] for s in ("train", "validation")}
    if not any(not r["error"] for r in rows["train"]):
        raise ValueError(f"the corpus at {corpus_dir(cfg)} has no usable train rows")

    train_dir = train_out_dir(cfg).resolve()  # absolute: Ray Train workers run elsewhere
    ray_dir = train_dir / "ray"
    train_dir.mkdir(parents=True, exist_ok=True)
    # An interrupted run (no summary.json yet) with the same settings resumes from its latest
    # checkpoint; a finished run, or one whose settings or corpus changed, starts afresh. Only
    # the training length (epochs, max_steps) and checkpoint keeping may change on resume.
    key = resume_key(cfg, manifest)
    key_file = train_dir / "resume_key.json"
    found = latest_checkpoint(ray_dir)
    previous_key = json.loads(key_file.read_text()) if key_file.is_file() else None
    resumed_from = None
    if found and not (train_dir / "summary.json").is_file() and previous_key == key:
        resumed_from = found[1]["step"]
        log.info("train: resuming an interrupted run from its latest checkpoint (step %d, %s)",
                 found[1]["step"], found[0])
        # Ray's own record of the run may lag the folder (see latest_checkpoint) or name
        # checkpoints that were removed; the workers resume from the folder, Ray starts a new record.
        (ray_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
        for d in checkpoint_dirs(ray_dir):
            if d != found[0]:
                shutil.rmtree(d, ignore_errors=True)
    else:
        if found and not (train_dir / "summary.json").is_file():
            log.warning("train: settings or corpus changed since the interrupted run; starting afresh")
        shutil.rmtree(ray_dir, ignore_errors=True)
        for stale in ("summary.json", "metrics.jsonl"):
            (train_dir / stale).unlink(missing_ok=True)
    key_file.write_text(json.dumps(key, indent=2))
    # The previous student no longer describes this training: never leave it for evaluate.
    shutil.rmtree(student_out_dir(cfg), ignore_errors=True)
    if cfg.student.init == "prune":
        student_dir = _ensure_baseline(cfg, out)
    else:
        student_dir = Path(resolve_model(cfg.student.model))
    if student_dir.exists():
        # Ray Train workers do not run in the driver's working directory: hand them absolute paths.
        student_dir = student_dir.resolve()
    (train_dir / "student_init.json").write_text(json.dumps(
        {"init": cfg.student.init, "baseline_student": str(student_dir), "teacher": cfg.teacher.model,
         "keep_layers": cfg.student.keep_layers}, indent=2))
    check_lora_targets(cfg, student_dir)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    require_chat_template(tokenizer, str(student_dir))
    source, why = choose_label_source(tokenizer, manifest, {r["teacher"] for r in table_rows}, cfg)
    log.info("train: labels are %s (%s)", source.replace("_", " "), why)
    stop_ids = set(manifest.get("stop_token_ids") or []) | stop_token_ids(student_dir)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    examples, dropped = _examples(rows["train"], tokenizer, cfg, source, stop_ids)
    val_examples, val_dropped = _examples(rows["validation"], tokenizer, cfg, source, stop_ids)
    if not examples:
        raise ValueError(f"no train example fits train.max_seq_len={cfg.train.max_seq_len} tokens "
                         f"(rows left out: {dropped})")
    t = cfg.train
    per_worker = len(examples) // t.workers
    if per_worker == 0:
        raise ValueError(f"{len(examples)} train examples cannot feed {t.workers} workers")
    dropped["uneven_split"] = len(examples) % t.workers
    truncated = sum(1 for r in rows["train"] if not r["error"] and r["finish_reason"] == "length")
    _log_dropped("train", dropped, cfg)
    _log_dropped("validation", val_dropped, cfg)
    if truncated:
        log.info("train: %d train answer(s) were cut at the token limit: %s", truncated,
                 "left out" if t.truncated_answers == "drop" else "trained without an end-of-turn label")
    steps_per_epoch = math.ceil(per_worker / t.batch_size)
    total = min(t.max_steps or 10**12, steps_per_epoch * t.epochs)
    if resumed_from is not None and resumed_from > total:
        raise ValueError(f"the interrupted run already trained {resumed_from} steps, past this run's length of "
                         f"{total} steps (train.epochs={t.epochs}, train.max_steps={t.max_steps}): raise them to "
                         f"continue it, or delete {ray_dir} to start afresh")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    init_ray()
    datasets = {"train": ray.data.from_items(examples)}
    has_validation = bool(val_examples)
    if has_validation:
        datasets["validation"] = ray.data.from_items(val_examples)
    error_file = train_dir / WORKER_ERROR_FILE
    error_file.unlink(missing_ok=True)
    loop_cfg = {"train": t.model_dump(), "student_dir": str(student_dir), "total_steps": total,
                "warmup_steps": warmup_steps(total, t.warmup_ratio), "steps_per_epoch": steps_per_epoch,
                "pad_id": pad_id, "has_validation": has_validation, "ray_dir": str(ray_dir),
                "error_file": str(error_file)}
    log.info("train: %d examples, %d workers x batch %d, %d steps (%d/epoch)", len(examples), t.workers,
             t.batch_size, total, steps_per_epoch)
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=str(train_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Worker crashes are retried from the latest checkpoint; config errors never reach
            # this point (checked above, or reported by the workers through error_file).
            failure_config=ray.train.FailureConfig(max_failures=2)),
        datasets=datasets,
        # Every worker reads the whole (small, tokenized) dataset and takes its own part of a
        # seeded per-epoch order: the same batches on resume, new batches every epoch.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
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
        error_file.unlink()
        raise ValueError(f"the workers could not set up the student from {student_dir} (a config error; "
                         f"not retried): {msg}")
    final = latest_checkpoint(ray_dir)
    if final is None or not final[1].get("final") or final[1]["step"] != total:
        raise RuntimeError(f"training ended without a final checkpoint in {ray_dir} (latest: "
                           f"{final[1] if final else None})")
    final_dir = final[0]
    history = torch.load(final_dir / STATE_FILE, map_location="cpu", weights_only=False)["history"]
    with (train_dir / "metrics.jsonl").open("w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    student_out = student_out_dir(cfg).resolve()
    tmp = student_out.with_name("student.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final_dir / HF_SUBDIR, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "raydistill_config.yaml").write_text(cfg.dump())
    shutil.rmtree(student_out, ignore_errors=True)
    tmp.rename(student_out)
    summary = {"steps": len(history), "examples": len(examples), "validation_examples": len(val_examples),
               "label_source": source, "label_source_reason": why,
               "truncated_rows": truncated, "truncated_answers": t.truncated_answers,
               "truncated_action": "dropped" if t.truncated_answers == "drop" else
               "trained without an end-of-turn label",
               "dropped": dropped, "dropped_validation": val_dropped,
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "val_loss": [r["val_loss"] for r in history if r.get("val_loss") is not None],
               "resumed_from_step": resumed_from, "seconds": round(seconds, 1), "student": str(student_out),
               "baseline_student": str(student_dir), "provenance": provenance()}
    (train_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if t.delete_checkpoints:
        shutil.rmtree(ray_dir, ignore_errors=True)
        log.info("train: deleted the training checkpoints in %s (train.delete_checkpoints)", ray_dir)
    else:  # Ray keeps train.keep_checkpoints of its own; the one a resume started from is not among them
        kept = sorted(checkpoint_dirs(ray_dir), key=lambda d: (checkpoint_step(d), d.name))
        for d in kept[:-t.keep_checkpoints]:
            shutil.rmtree(d, ignore_errors=True)
    log.info("train: loss %.4f -> %.4f over %d steps in %.0f s -> %s", summary["first_loss"],
             summary["last_loss"], len(history), seconds, student_out)
    return summary
