"""``plan.checkpoint_steps`` (what benchmarks/sizing.py counts) is what the worker loop really
saves: the Ray-free loop (``raydistill.train.loop``) on a tiny student, its checkpoints recorded."""

from __future__ import annotations

import pytest
import torch

from raydistill.train import loop as L
from raydistill.train.plan import checkpoint_steps
from raydistill.train.smoke import build_student, settings, synthetic_batches


@pytest.mark.parametrize("total,per_epoch,every,validation", [(7, 3, 2, True), (7, 3, 2, False), (5, 2, 0, False)])
def test_the_loop_saves_at_checkpoint_steps(tmp_path, total, per_epoch, every, validation):
    from transformers import AutoModelForCausalLM

    folder = build_student(tmp_path / "student", hidden=16, layers=1, heads=2, vocab=48)
    model = AutoModelForCausalLM.from_pretrained(folder)
    data = synthetic_batches(per_epoch, 1, 6, 48)
    saved: list[int] = []
    plan = L.Plan(total_steps=total, warmup_steps=0, steps_per_epoch=per_epoch, micro_per_epoch=per_epoch,
                  has_validation=validation)
    L.train_loop(model, torch.optim.SGD(model.parameters(), lr=1e-3), t=settings(checkpoint_every_steps=every),
                 plan=plan, rank=0, world=1, device=torch.device("cpu"), collectives=L.Collectives("cpu", 1),
                 train_batches=lambda e: iter(data), collate=lambda m: m,
                 validation_batches=(lambda: iter(data[:1])) if validation else None,
                 store=L.CheckpointStore(tmp_path / "ray", keep=100,
                                         report=lambda metrics, folder: saved.append(metrics["step"])),
                 say=lambda s: None)
    assert saved == checkpoint_steps(total, per_epoch, every, validation)
