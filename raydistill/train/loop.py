"""The training loop of one worker, without Ray: ``train_loop`` takes the model, the device, the
rank and world size, the batch iterators and a checkpoint store, and runs the optimizer steps.

``worker.train_loop_per_worker`` is its Ray Train adapter (Ray's process group, dataset shards,
``ray.train.report``); ``raydistill.train.smoke`` drives it with a plain ``torch.distributed``
process group (NCCL on one GPU, or gloo on CPU) and local batches. Importing this module imports
torch and no Ray (nor pydantic: ``t`` is any object with ``TrainConfig``'s attributes).

Collectives: every collective the loop issues on its own tensors (a step's token counts and loss
sums, the validation sums, the RNG states of a checkpoint) goes through one ``Collectives``
object, on tensors placed on the worker's ``device``: NCCL takes CUDA tensors only, so a CPU
tensor there fails the first step of a GPU job. ``Collectives`` refuses a tensor on another
device at any world size (world 1 included), so a one-GPU run shows the fault too. The
collectives inside DDP, FSDP2 and ``torch.distributed.checkpoint`` are torch's own.

A step's loss is the token mean over all its micro-batches (``t.grad_accum_steps``) and all ranks:
each micro-batch's loss sums are divided by the step's global token counts (all-reduced before
the forward passes) and multiplied by ``world`` (DDP/FSDP average gradients over ranks).

Checkpoints (``CheckpointStore``): ``state.pt`` holds the trainable parameters only (a LoRA run's
adapters; the frozen base is reloaded from the student reference), the optimizer state, the
step, the metric history and every rank's RNG state (torch CPU and CUDA generators, Python's
``random``, numpy's global generator), so a resumed run takes the steps an uninterrupted one would
take, dropout included. It is read with ``torch.load(weights_only=True)``: nothing in it runs code.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from . import parallel
from .checkpoints import (
    HF_SUBDIR,
    HISTORY_FILE,
    STATE_FILE,
    best_checkpoint,
    latest_checkpoint,
    load_state,
    prune,
    write_meta,
)
from .losses import IGNORE_INDEX, combine
from .plan import Plan
from .prefetch import prefetched


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 0 at ``total`` (a multiplier of
    the peak rate for the 0-based optimizer ``step``). A pure function of (step, total, warmup):
    a run resumed with another length follows the schedule of the new length from the resume
    step on, exactly as an uninterrupted run of that length would."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Collectives:
    """The loop's own collectives, on ``device`` (the worker's: ``cuda:N`` under NCCL, ``cpu``
    under gloo), over ``world`` ranks.

    ``ops`` is the module or object with ``all_reduce(t)``, ``all_gather(list, t)`` and
    ``broadcast(t, src)`` (default ``torch.distributed``; tests give a stand-in). With
    ``world == 1`` no collective is issued, but the device is checked all the same.

    Raises:
        RuntimeError: a tensor not on ``device`` (what NCCL does with a CPU tensor, at every world size).
    """

    def __init__(self, device, world: int, ops=None):
        self.device = torch.device(device)
        self.world = world
        self._ops = ops

    @property
    def ops(self):
        if self._ops is None:
            import torch.distributed as dist

            self._ops = dist
        return self._ops

    def _check(self, x: torch.Tensor, what: str) -> None:
        d = self.device
        if x.device.type != d.type or (d.index is not None and x.device.index not in (None, d.index)):
            raise RuntimeError(f"{what}: a tensor on {x.device} given to a collective of the worker on {d} "
                               "(NCCL takes CUDA tensors only): create it on the worker's device")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        self._check(x, "all_reduce")
        if self.world > 1:
            self.ops.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (same shape on every rank), stacked: (world, *x.shape), on ``device``."""
        self._check(x, "all_gather")
        if self.world == 1:
            return x.unsqueeze(0)
        out = [torch.empty_like(x) for _ in range(self.world)]
        self.ops.all_gather(out, x)
        return torch.stack(out)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype everywhere), in place."""
        self._check(x, "broadcast")
        if self.world > 1:
            self.ops.broadcast(x, src)
        return x


# --- RNG state --------------------------------------------------------------------------------

def _rng_parts(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (fixed shapes on every rank): torch's CPU generator,
    the CUDA generator of ``device`` (empty off CUDA), Python's ``random`` and numpy's global
    generator (Mersenne twister words, position, and the cached Gaussian)."""
    import numpy as np

    version, words, gauss = random.getstate()
    np_name, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cpu = torch.device("cpu")  # staged on the CPU, where the generators' states live; moved for collectives
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8, device=cpu)
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": torch.tensor([version, *words], dtype=torch.int64, device=cpu),
            "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64, device=cpu),
            "numpy": torch.tensor([*np_words.tolist(), np_pos], dtype=torch.int64, device=cpu),
            "numpy_gauss": torch.tensor([np_has_gauss, np_gauss], dtype=torch.float64, device=cpu)}


def _set_rng_parts(parts: dict[str, torch.Tensor], device: torch.device) -> None:
    import numpy as np

    # clone: a row of the gathered (world, n) tensor has a storage offset, and torch.set_rng_state
    # reads the storage from its start (torch 2.13 segfaults on rank 1 otherwise)
    parts = {k: v.cpu().clone() for k, v in parts.items()}
    torch.set_rng_state(parts["torch"].to(torch.uint8))
    if device.type == "cuda" and parts["cuda"].numel():
        torch.cuda.set_rng_state(parts["cuda"].to(torch.uint8), device)
    py = parts["python"].tolist()
    has, gauss = parts["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(w) for w in py[1:]), gauss if has else None))
    words = parts["numpy"].tolist()
    np_has, np_gauss = parts["numpy_gauss"].tolist()
    np.random.set_state(("MT19937", np.array(words[:-1], dtype=np.uint32), int(words[-1]), int(np_has), np_gauss))


def gather_rng_state(collectives: Collectives) -> dict[str, torch.Tensor]:
    """Every rank's RNG state, ``{part: (world, n) tensor on CPU}`` (a collective: every rank
    calls it; rank 0 stores it in the checkpoint)."""
    parts = _rng_parts(collectives.device)
    return {k: collectives.all_gather(v.to(collectives.device)).cpu() for k, v in parts.items()}


def restore_rng_state(saved: dict[str, torch.Tensor] | None, collectives: Collectives, rank: int) -> bool:
    """Set this rank's RNG state from ``gather_rng_state``'s dict (rank 0's argument, broadcast;
    the other ranks' is ignored). A collective. Returns False (state left as it is) when rank 0
    has none (a checkpoint written before RNG states were kept) or it holds another world size."""
    own = _rng_parts(collectives.device)
    world = collectives.world
    ok = torch.tensor([int(saved is not None and all(k in saved and saved[k].shape == (world, *v.shape)
                                                         for k, v in own.items()))] if rank == 0 else [0],
                      dtype=torch.int64, device=collectives.device)
    if not int(collectives.broadcast(ok)[0]):
        return False
    restored = {}
    for k, v in own.items():
        x = (saved[k].to(v.dtype) if rank == 0 else torch.zeros((world, *v.shape), dtype=v.dtype, device=collectives.device))
        restored[k] = collectives.broadcast(x.to(collectives.device))[rank]
    _set_rng_parts(restored, collectives.device)
    return True


# --- checkpoints ------------------------------------------------------------------------------

class CheckpointStore:
    """Where the loop's checkpoints go: ``ray_dir`` (a local path or a ``StoragePath``), keeping
    the latest ``keep`` and the best by validation loss (``checkpoints.prune``).

    ``report(metrics, folder)`` publishes a checkpoint folder written by rank 0 (None on the other
    ranks); it is called on every rank. The Ray adapter passes ``ray.train.report``; without it
    rank 0 copies the folder to ``ray_dir/checkpoint_<step>[_final]`` itself (Ray-free runs)."""

    def __init__(self, ray_dir, keep: int, report: Callable[[dict, Path | None], None] | None = None):
        self.ray_dir = ray_dir
        self.keep = keep
        self.report = report

    def latest(self):
        """(folder, its meta dict) of the latest complete checkpoint, or None."""
        return latest_checkpoint(self.ray_dir)

    def best(self):
        """(folder, its meta dict) of the complete checkpoint with the lowest validation loss, or None."""
        return best_checkpoint(self.ray_dir)

    def publish(self, folder: Path | None, metrics: dict, final: bool, step: int, rank: int) -> None:
        if self.report is not None:
            self.report(metrics, folder)
        elif folder is not None:
            dest = Path(str(self.ray_dir)) / f"checkpoint_{step:09d}{'_final' if final else ''}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(folder, dest)
        if rank == 0 and not final:
            prune(self.ray_dir, self.keep)


def export_dtype(t) -> torch.dtype:
    """The dtype the student trains in and is exported in: bf16 on GPU with ``precision`` auto or
    bf16, else fp32."""
    return torch.bfloat16 if t.use_gpu and t.precision in ("auto", "bf16") else torch.float32


def student_load_dtype(t) -> torch.dtype:
    """The dtype the student's weights are loaded in: a LoRA run's frozen base in bf16 on GPU
    (``export_dtype``; peft keeps the adapters in fp32), every trained weight in fp32."""
    return export_dtype(t) if t.lora.enabled else torch.float32


# --- the loop ---------------------------------------------------------------------------------

def _loss_sums(model, teacher, batch: dict, t, kd_on: bool, vocab: int | None):
    """Forward one micro-batch; returns its ``losses.LossSums``."""
    from .losses import distill_loss_sums

    # use_cache=False: with a cache, transformers skips telling packed examples apart by their position ids
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    logits = model(**kwargs).logits
    kd = t.kd
    if not kd_on:
        return distill_loss_sums(logits, batch["labels"], chunk_size=kd.chunk_size)
    if teacher is None:
        return distill_loss_sums(logits, batch["labels"], kd_mask=batch.get("kd_mask"),
                                 teacher_topk_ids=batch.get("topk_ids"), teacher_topk_logprobs=batch.get("topk_logprobs"),
                                 temperature=kd.temperature, divergence=kd.divergence, beta=kd.beta,
                                 chunk_size=kd.chunk_size)
    with torch.no_grad():
        hidden = teacher.base_model(**kwargs).last_hidden_state
    head = teacher.get_output_embeddings()

    def teacher_logits(start: int, end: int):
        with torch.no_grad():
            return head(hidden[:, start:end])[..., :vocab]

    return distill_loss_sums(logits[..., :vocab], batch["labels"], teacher_logits=teacher_logits,
                             temperature=kd.temperature, divergence=kd.divergence, beta=kd.beta,
                             chunk_size=kd.chunk_size)


def _sums_of(s) -> torch.Tensor:
    """(ce_sum, ce_tokens, kd_sum, kd_tokens) of one micro-batch as a float64 vector on its device
    (no host sync)."""
    return torch.stack([s.ce_sum.detach().double(), s.ce_tokens.double(), s.kd_sum.detach().double(),
                        s.kd_tokens.double()])


def train_loop(model, opt, *, t, plan: Plan, rank: int, world: int, device, collectives: Collectives,
               train_batches: Callable[[int], Iterable], collate: Callable[[Any], dict],
               validation_batches: Callable[[], Iterable] | None = None, teacher=None,
               store: CheckpointStore, tracker=None, say: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` (wrapped by ``parallel.wrap_model``, on ``device``) with ``opt`` for
    ``plan.total_steps`` optimizer steps, resuming from ``store``'s latest checkpoint.

    With validation rows, ``t.early_stopping_patience`` (None: off) stops at the epoch end where
    the validation loss has not been lower than its minimum for that many evaluations, and
    ``t.export == "best"`` writes the weights of the checkpoint with the lowest validation loss
    into the final checkpoint's ``hf/`` (its ``state.pt`` keeps the last step's state). The final
    checkpoint's meta records ``exported_step`` and ``stopped_early``.

    Args:
        t: ``TrainConfig`` (or an object with its attributes).
        train_batches: ``epoch -> iterable`` of this rank's raw micro-batches of that epoch, in a
            fixed order per epoch (a resumed run skips the ones already trained).
        collate: raw micro-batch -> dict of CPU tensors (``examples.collate``'s keys: input_ids,
            labels, position_ids (batch, seq) long, attention_mask or None, and for a corpus
            teacher kd_mask, topk_ids, topk_logprobs).
        validation_batches: ``() -> iterable`` of the whole validation split's raw micro-batches
            (every rank reads all of them); used when ``plan.has_validation``.
        tracker: ``observe.MlflowLogger`` or None.
    Returns:
        The metric history (one dict per step; rank 0's is complete after a resume).
    Raises:
        RuntimeError: this rank's shard ended before the planned micro-batches of an epoch, or a
            collective got a tensor off ``device``.
    """
    device = torch.device(device)
    kd_on = t.loss == "logit_kd"
    offline_kd = kd_on and t.kd.teacher == "corpus"  # the teacher's top-k come with the rows
    total, warmup = plan.total_steps, plan.warmup_steps
    steps_per_epoch, accum, every = plan.steps_per_epoch, t.grad_accum_steps, t.checkpoint_every_steps
    unwrapped = parallel.unwrap(model)
    alpha = t.kd.alpha if kd_on else 0.0
    export_best = getattr(t, "export", "last") == "best" and plan.has_validation
    patience = getattr(t, "early_stopping_patience", None) if plan.has_validation else None

    step, history = 0, []
    found = store.latest()
    if found is not None:
        # Only rank 0 reads the state (trainable weights + optimizer); it is broadcast (collectives:
        # every rank calls them). Only rank 0 keeps the metric history.
        state = load_state(found[0]) if rank == 0 else {"model": None, "optimizer": None, "history": [], "rng": None}
        parallel.load_full_state_dict(model, state["model"], trainable_only=True)
        parallel.load_optimizer_state(model, opt, state["optimizer"])
        step, history = int(found[1]["step"]), state["history"]
        rng_ok = restore_rng_state(state.get("rng"), collectives, rank)  # last: nothing above draws
        del state
        if rank == 0:
            say(f"[raydistill] resumed from checkpoint at step {step} ({found[0].name})"
                f"{'' if rng_ok else '; it holds no RNG state of this world size: dropout draws differ'}")

    def flag(value: int) -> int:
        """Rank 0's ``value`` on every rank (a collective)."""
        return int(collectives.broadcast(torch.tensor([value], dtype=torch.int64, device=device))[0])

    def evaluations_since_best() -> int:
        """Rank 0: validation losses measured since the lowest one (0: the latest is the lowest)."""
        vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
        return len(vals) - 1 - vals.index(min(vals)) if vals else 0

    def load_best_for_export(val_loss: float | None) -> int:
        """``train.export: best``: put the weights of the checkpoint with the lowest validation loss
        into the model (unless the final step's own is lower) and return that step. Collectives."""
        best = store.best() if rank == 0 else None
        use = rank == 0 and best is not None and not (val_loss is not None and val_loss < best[1]["val_loss"])
        if not flag(int(use)):
            return step
        state = load_state(best[0]) if rank == 0 else {"model": None}
        parallel.load_full_state_dict(model, state["model"], trainable_only=True)
        return flag(int(best[1]["step"]) if rank == 0 else 0)

    def save_state(final: bool, val_loss: float | None, stopped_early: bool = False) -> None:
        metrics = history[-1] if history else {"step": step}
        rng = gather_rng_state(collectives)  # a collective: every rank's generators, gathered to rank 0
        model_state = parallel.full_state_dict(model, trainable_only=True)  # collectives: every rank
        opt_state = parallel.optimizer_state(model, opt)
        exported_step = load_best_for_export(val_loss) if final and export_best else step
        frozen = any(not p.requires_grad for p in model.parameters())
        # the whole student, for export (a full fine-tune's trainable state is the whole student, unless
        # the best checkpoint's weights were loaded for export)
        full = (parallel.full_state_dict(model) if frozen or exported_step != step else model_state) if final else None
        with tempfile.TemporaryDirectory() as d:
            folder = None
            if rank == 0:
                folder = Path(d)
                torch.save({"model": model_state, "optimizer": opt_state, "step": step, "history": history,
                            "rng": rng}, folder / STATE_FILE)
                (folder / HISTORY_FILE).write_text(json.dumps(history))  # the driver reads this, not state.pt
                if final:  # the student as save_pretrained writes it (LoRA merged), in the dtype of training
                    parallel.save_hf(unwrapped, full, folder / HF_SUBDIR, dtype=export_dtype(t))
                write_meta(folder, step, final, val_loss,
                           **({"exported_step": exported_step, "stopped_early": stopped_early} if final else {}))
            store.publish(folder, {**metrics, "final": final}, final, step, rank)

    def to_device(batch: dict) -> dict:
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def autocast():
        return parallel.autocast(t.use_gpu, t.precision)

    def validation_loss() -> tuple[float, float, float | None]:
        """(loss, ce, kd): token means of the training objective and its parts over every validation
        row (kd None for sequence_kd); under DDP rank r scores the micro-batches r, r + world, ... of
        the whole validation set; none is left out."""
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        sharded = t.strategy == "fsdp"  # every rank must run every forward: each scores all rows
        with torch.no_grad():
            for i, raw in enumerate(validation_batches()):
                if i % world != rank and not sharded:
                    continue
                with autocast():
                    # DDP: the unwrapped module, ranks score different numbers of batches (no collective)
                    s = _loss_sums(model if sharded else unwrapped, teacher, to_device(collate(raw)), t, kd_on,
                                   plan.vocab)
                sums += _sums_of(s)
        if not sharded:
            collectives.all_reduce(sums)
        model.train()
        ce_sum, ce_n, kd_sum, kd_n = sums.tolist()
        ce, kd = ce_sum / max(ce_n, 1), kd_sum / max(kd_n, 1)
        return round(alpha * kd + (1 - alpha) * ce, 6), round(ce, 6), round(kd, 6) if kd_on else None

    model.train()
    t_start = time.perf_counter()
    steps_here = 0
    stop = False
    while step < total and not stop:
        epoch = step // steps_per_epoch
        skip = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch trained before a resume
        group: list[dict] = []
        # the next micro-batches are collated in a background thread while this one trains
        # (examples.prefetched); those trained before a resume are skipped, not even collated
        for i, m in enumerate(prefetched(train_batches(epoch), collate, depth=2, skip=skip)):
            if i < skip:
                continue
            group.append(m)
            last_of_epoch = i + 1 >= plan.micro_per_epoch
            if len(group) < accum and not last_of_epoch:
                continue
            t0 = time.perf_counter()
            lr = t.lr * lr_lambda(step, total, warmup)  # the rate of this step, never a restored state
            for g in opt.param_groups:
                g["lr"] = lr
            # The step's loss is the token mean over all its micro-batches and ranks: normalize by the
            # global counts (times world: gradient averaging over ranks divides by it again).
            label_n = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in group)
            # KD positions: those with a stored teacher distribution (corpus), else every label
            # position (online teacher; unused for sequence_kd)
            kd_n = sum(int(m["kd_mask"][:, 1:].sum()) for m in group) if offline_kd else label_n
            token_n = sum(int(m["input_ids"].numel() if m.get("attention_mask") is None
                              else m["attention_mask"].sum()) for m in group)
            counts = collectives.all_reduce(
                torch.tensor([label_n, kd_n, token_n], dtype=torch.float64, device=device))
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            opt.zero_grad(set_to_none=True)
            for j, m in enumerate(group):
                with parallel.no_grad_sync(model, skip=j < len(group) - 1):
                    with autocast():
                        s = _loss_sums(model, teacher, to_device(m), t, kd_on, plan.vocab)
                    (combine(s, alpha, counts[0], counts[1]) * world).backward()
                sums += _sums_of(s)
            grad_norm = parallel.clip_grad_norm(model, t.grad_clip)
            opt.step()
            step += 1
            steps_here += 1
            group = []
            collectives.all_reduce(sums)
            ce_sum, ce_n, kd_sum, kd_n_ = sums.tolist()
            ce = ce_sum / max(ce_n, 1)
            kd = kd_sum / max(kd_n_, 1) if kd_on else None
            seconds = time.perf_counter() - t0
            rec = {"step": step, "epoch": epoch, "loss": round(alpha * (kd or 0.0) + (1 - alpha) * ce, 6),
                   "ce": round(ce, 6), "kd": None if kd is None else round(kd, 6), "lr": lr,
                   "grad_norm": round(float(grad_norm), 4), "tokens": int(ce_n),
                   "tokens_per_s": round(float(counts[2]) / seconds, 1), "seconds": round(seconds, 3)}
            history.append(rec)
            if tracker is not None:
                tracker.log_step(rec)
            if rank == 0:
                eta = (time.perf_counter() - t_start) / steps_here * (total - step)
                say(f"[raydistill] step {step}/{total} epoch {epoch} loss {rec['loss']:.4f} "
                    f"lr {rec['lr']:.2e} {rec['seconds']:.1f}s/step eta {eta:.0f}s")
            end_of_epoch = step >= total or step % steps_per_epoch == 0
            val = None
            if end_of_epoch and plan.has_validation:
                val, rec["val_ce"], rec["val_kd"] = validation_loss()
                rec["val_loss"] = val
                if tracker is not None:
                    tracker.log_step({"step": step, "val_loss": val, "val_ce": rec["val_ce"], "val_kd": rec["val_kd"]})
                if rank == 0:
                    say(f"[raydistill] epoch {epoch} validation loss {val:.4f}")
                if patience and flag(int(rank == 0 and evaluations_since_best() >= patience)):
                    stop = True
                    if rank == 0:
                        say(f"[raydistill] early stop at step {step}: no lower validation loss in the last "
                            f"{patience} evaluations (train.early_stopping_patience)")
            if step >= total or end_of_epoch:
                break
            if every and step % every == 0:
                save_state(final=False, val_loss=val)
        else:  # the shard ended before the planned steps: continuing would loop or hang the other ranks
            raise RuntimeError(f"rank {rank} got fewer than the {plan.micro_per_epoch} micro-batches planned for "
                               f"epoch {epoch} (step {step} of {total})")
        if step < total and not stop:
            # at each epoch end without checkpoint_every_steps, and whenever validation ran (so the best
            # checkpoint by validation loss can be kept)
            if not every or step % every == 0 or plan.has_validation:
                save_state(final=False, val_loss=history[-1].get("val_loss") if history else None)
    save_state(final=True, val_loss=history[-1].get("val_loss") if history else None, stopped_early=stop)
    return history
