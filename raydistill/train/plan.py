"""The step plan of a training run: how many optimizer steps, how many of them warm up, and after
which ones a checkpoint is saved, from the number of train rows and the train settings.

Plain arithmetic (no Ray, torch or pydantic): the driver (``train.stage``) plans with it, the
worker loop (``train.loop``) runs the ``Plan`` it is handed, and ``benchmarks/sizing.py`` counts
the same steps and checkpoints. It decides nothing about what is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Plan:
    """What the driver planned: ``total_steps`` optimizer steps, ``warmup_steps`` of them warmup,
    ``steps_per_epoch`` steps and ``micro_per_epoch`` micro-batches per rank per epoch; ``vocab``
    the tokenizer's size (logits past it are cut for an online teacher; None: none cut);
    ``has_validation``: score the validation rows at each epoch end."""
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    micro_per_epoch: int
    vocab: int | None = None
    has_validation: bool = False


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
