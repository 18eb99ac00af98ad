"""The Ray-free worker loop (raydistill.train.loop): collectives on the worker's device, RNG state
restored on resume, LoRA checkpoints that hold the adapters only, checkpoints that never run code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raydistill.train import loop as L
from raydistill.train.checkpoints import CheckpointError, latest_checkpoint, load_state
from raydistill.train.smoke import build_student, run_phase, settings, synthetic_batches

VOCAB = 96


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return build_student(tmp_path_factory.mktemp("loop") / "student", hidden=32, layers=2, heads=2, vocab=VOCAB)


class RefusingOps:
    """A process group of ``world`` ranks that, like NCCL, refuses tensors off its device; the
    other ranks hold the same values as this one (sums are ``world`` × this rank's)."""

    def __init__(self, device, world: int):
        self.device, self.world, self.calls = torch.device(device), world, []

    def _check(self, name, x):
        self.calls.append(name)
        if x.device != self.device:
            raise RuntimeError(f"{name}: tensor on {x.device}, process group on {self.device}")

    def all_reduce(self, x):
        self._check("all_reduce", x)
        x.mul_(self.world)

    def all_gather(self, out, x):
        self._check("all_gather", x)
        for o in out:
            o.copy_(x)

    def broadcast(self, x, src):
        self._check("broadcast", x)


def test_every_collective_gets_tensors_on_the_loops_device(student, tmp_path):
    """On a GPU worker a tensor made without ``device=`` lands on the CPU and NCCL refuses it.
    Here the default device is ``meta`` while the loop's device is ``cpu``: a tensor the loop does
    not place lands on meta, and the refusing process group (world 2) fails the run."""
    from transformers import AutoModelForCausalLM

    t = settings(loss="logit_kd", grad_accum_steps=2, checkpoint_every_steps=1)
    model = AutoModelForCausalLM.from_pretrained(student)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # AdamW makes its step counter without a device
    data = synthetic_batches(4, 2, 12, VOCAB, top_k=4)
    ops = RefusingOps("cpu", 2)
    plan = L.Plan(total_steps=2, warmup_steps=0, steps_per_epoch=2, micro_per_epoch=4, has_validation=True)
    with torch.device("meta"):
        hist = L.train_loop(model, opt, t=t, plan=plan, rank=0, world=2, device=torch.device("cpu"),
                            collectives=L.Collectives("cpu", 2, ops=ops), train_batches=lambda e: iter(data),
                            collate=lambda m: m, validation_batches=lambda: iter(data[:2]),
                            store=L.CheckpointStore(tmp_path / "ray", keep=2), say=lambda s: None)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["val_loss"] is not None
    # step counts and sums, validation sums, every rank's RNG state at each checkpoint
    assert {"all_reduce", "all_gather"} <= set(ops.calls) and ops.calls.count("all_reduce") >= 5
    # two ranks' tokens: this rank's labels counted twice
    assert hist[0]["tokens"] == 2 * sum(int((m["labels"][:, 1:] != -100).sum()) for m in data[:2])


def test_collectives_refuse_a_tensor_off_the_device_even_on_one_rank():
    c = L.Collectives("meta", 1)
    with pytest.raises(RuntimeError, match="tensor on cpu given to a collective of the worker on meta"):
        c.all_reduce(torch.zeros(2))


def test_resume_with_lora_dropout_matches_an_uninterrupted_run(student, tmp_path):
    """LoRA dropout draws from torch's generator: a resumed run takes the same draws (RNG state in
    the checkpoint) and ends with the same losses and weights."""
    from raydistill.train import parallel

    t = settings(lora={"enabled": True, "dropout": 0.3}, grad_accum_steps=1, checkpoint_every_steps=2)
    data = synthetic_batches(4, 2, 12, VOCAB, seed=3)
    full_hist, full = run_phase(student, t, data, steps=4, ray_dir=tmp_path / "full", device=torch.device("cpu"))
    name = "checkpoint_000000002"
    shutil.copytree(tmp_path / "full" / name, tmp_path / "resumed" / name)
    torch.manual_seed(1234)  # whatever the process drew before: the checkpoint's state wins
    hist, resumed = run_phase(student, t, data, steps=4, ray_dir=tmp_path / "resumed", device=torch.device("cpu"))
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist]
    a, b = parallel.full_state_dict(full), parallel.full_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the RNG state is what made them equal: without it the steps after the resume differ
    state = load_state(tmp_path / "resumed" / name)
    assert state["rng"]["torch"].shape[0] == 1  # one row per rank
    del state["rng"]
    (tmp_path / "norng").mkdir()
    shutil.copytree(tmp_path / "full" / name, tmp_path / "norng" / name)
    torch.save(state, tmp_path / "norng" / name / "state.pt")
    from raydistill.train.checkpoints import write_meta

    (tmp_path / "norng" / name / "raydistill_checkpoint.json").unlink()
    write_meta(tmp_path / "norng" / name, 2, False)
    hist2, _ = run_phase(student, t, data, steps=4, ray_dir=tmp_path / "norng", device=torch.device("cpu"))
    assert [h["loss"] for h in hist2[2:]] != [h["loss"] for h in full_hist[2:]]


def test_lora_checkpoint_holds_the_adapters_only(student, tmp_path):
    t = settings(lora={"enabled": True, "dropout": 0.0, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                 checkpoint_every_steps=1)
    data = synthetic_batches(2, 2, 12, VOCAB)
    _, model = run_phase(student, t, data, steps=2, ray_dir=tmp_path / "ray", device=torch.device("cpu"))
    folder, meta = latest_checkpoint(tmp_path / "ray")
    saved = load_state(folder)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    # 2 layers × (q, v) × (A, B)
    assert len(saved["model"]) == 8 and {k: v.shape for k, v in saved["model"].items()} == trainable
    assert all(".lora_A." in k or ".lora_B." in k for k in saved["model"])
    assert set(saved["optimizer"]["state"]) == set(trainable)
    # the exported student is whole (LoRA merged) and loads back
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder.local() / "hf")
    assert sum(p.numel() for p in exported.parameters()) > 10 * sum(v.numel() for v in saved["model"].values())


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint_1"
    folder.mkdir()
    torch.save({"model": {}, "evil": _RunsCode(str(marker))}, folder / "state.pt")
    from raydistill.storage import storage_path

    with pytest.raises(CheckpointError, match=r"state\.pt.*refused"):
        load_state(storage_path(folder))
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def test_losses_ignore_index_is_the_examples_one():
    from raydistill.train.examples import IGNORE_INDEX
    from raydistill.train.losses import IGNORE_INDEX as LOSSES

    assert LOSSES == IGNORE_INDEX == -100


def test_early_stopping_and_export_of_the_best_checkpoint(student, tmp_path):
    """Training on tokens 3..40 while validating on 50..90 with a high rate: the validation loss
    soon rises. Patience 2 stops two evaluations after the lowest one (of 6 planned), and
    export=best writes that checkpoint's weights into hf/."""
    from safetensors.torch import load_file

    t = settings(export="best", early_stopping_patience=2, lr=3e-2)
    g = torch.Generator().manual_seed(0)

    def rows(lo, hi, n):
        out = []
        for _ in range(n):
            ids = torch.randint(lo, hi, (2, 12), generator=g)
            out.append({"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(12).expand(2, 12),
                        "attention_mask": torch.ones(2, 12, dtype=torch.long)})
        return out

    train, val = rows(3, 40, 1), rows(50, 90, 2)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(student)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    plan = L.Plan(total_steps=6, warmup_steps=0, steps_per_epoch=1, micro_per_epoch=1, has_validation=True)
    hist = L.train_loop(model, opt, t=t, plan=plan, rank=0, world=1, device=torch.device("cpu"),
                        collectives=L.Collectives("cpu", 1), train_batches=lambda e: iter(train),
                        collate=lambda m: m, validation_batches=lambda: iter(val),
                        store=L.CheckpointStore(tmp_path / "ray", keep=5), say=lambda s: None)
    vals = [h["val_loss"] for h in hist]
    best = vals.index(min(vals)) + 1  # the step of the lowest validation loss (one evaluation per step)
    # the run stops at the first evaluation 2 past the best one: every later loss was not lower
    assert len(hist) == best + 2 < 6 and min(vals[best:]) >= vals[best - 1], vals
    final, meta = latest_checkpoint(tmp_path / "ray")
    assert meta["final"] and meta["step"] == len(hist) and meta["stopped_early"] is True
    assert meta["exported_step"] == best
    from raydistill.storage import storage_path

    best_weights = load_state(storage_path(tmp_path / "ray" / f"checkpoint_{best:09d}"))["model"]
    exported = load_file(final.local() / "hf" / "model.safetensors")
    for name, value in exported.items():
        assert torch.equal(value, best_weights[name]), name
    # state.pt keeps the last step's weights (a resume would continue from there)
    assert not torch.equal(load_state(final)["model"]["model.norm.weight"], best_weights["model.norm.weight"])


def test_export_last_without_early_stopping_runs_every_step(student, tmp_path):
    t = settings()
    data = synthetic_batches(2, 2, 12, VOCAB)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(student)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    plan = L.Plan(total_steps=2, warmup_steps=0, steps_per_epoch=1, micro_per_epoch=1, has_validation=True)
    hist = L.train_loop(model, opt, t=t, plan=plan, rank=0, world=1, device=torch.device("cpu"),
                        collectives=L.Collectives("cpu", 1), train_batches=lambda e: iter(data[e:e + 1]),
                        collate=lambda m: m, validation_batches=lambda: iter(data),
                        store=L.CheckpointStore(tmp_path / "ray", keep=5), say=lambda s: None)
    _, meta = latest_checkpoint(tmp_path / "ray")
    assert len(hist) == 2 and meta["exported_step"] == 2 and meta["stopped_early"] is False


class _Rank1Ops(RefusingOps):
    """Rank 1 of 2: each broadcast delivers the next of rank 0's tensors."""

    def __init__(self, delivered):
        super().__init__("cpu", 2)
        self.delivered = list(delivered)

    def broadcast(self, x, src):
        self._check("broadcast", x)
        x.copy_(self.delivered.pop(0))


def test_rng_state_of_a_rank_past_0_is_restored(tmp_path):
    """Rank 1 restores its own row of the gathered states (a row with a storage offset: torch's
    set_rng_state crashed on it before the copy)."""
    import random

    torch.manual_seed(5)
    random.seed(5)
    saved = L.gather_rng_state(L.Collectives("cpu", 2, ops=RefusingOps("cpu", 2)))
    want = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    ops = _Rank1Ops([torch.tensor([1])] + [saved[k] for k in saved])
    assert L.restore_rng_state(None, L.Collectives("cpu", 2, ops=ops), rank=1)
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]


def test_gradient_accumulation_equals_a_bigger_batch_in_the_loop(student, tmp_path):
    """The same 8 rows as one micro-batch of 8 (accumulation 1) or as 8 micro-batches of 1
    (accumulation 8): one optimizer step each, the step loss a token mean over the step's rows, so
    the step losses and, after 3 AdamW steps, the weights agree (logit KD on a corpus top-k: the
    cross-entropy and KD parts both). The same through Ray Train: tests/test_train_kd.py (slow)."""
    from raydistill.train import parallel

    from .helpers import assert_same_weights

    batch = synthetic_batches(1, 8, 12, VOCAB, top_k=4, seed=5)[0]
    for i in range(8):  # answers of 3 to 6 tokens: a mean of micro-batch means would differ
        batch["labels"][i, : 6 + i % 4] = -100
    batch["kd_mask"] = batch["labels"] != -100
    batch["topk_logprobs"] = torch.where(batch["kd_mask"][..., None], batch["topk_logprobs"], float("-inf"))
    whole = [batch] * 3  # the same rows each step
    singles = [{k: v[i: i + 1] for k, v in m.items()} for m in whole for i in range(8)]
    runs = {}
    for name, batches, accum in (("big", whole, 1), ("small", singles, 8)):
        t = settings(loss="logit_kd", batch_size=8 // accum, grad_accum_steps=accum, lr=1e-2)
        hist, model = run_phase(student, t, batches, steps=3, ray_dir=tmp_path / name, device=torch.device("cpu"))
        runs[name] = hist, parallel.full_state_dict(model)
    (big, sa), (small, sb) = runs["big"], runs["small"]
    assert len(big) == len(small) == 3
    for x, y in zip(big, small):
        assert x["tokens"] == y["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
        for key in ("loss", "ce", "kd"):
            assert y[key] == pytest.approx(x[key], rel=1e-4), (key, x, y)
    assert big[-1]["loss"] < big[0]["loss"]  # the rate mattered
    assert_same_weights(sa, sb)
