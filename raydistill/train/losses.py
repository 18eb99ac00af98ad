"""Distillation losses: pure functions of tensors.

Sequence-level KD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation", arXiv:1606.07947):
the student is trained with token cross-entropy on the teacher's generated response, i.e.

    L = - (1 / N) * sum_{b, t : labels[b, t] != -100} log softmax(logits[b, t-1])[labels[b, t]]

where N is the number of unmasked label positions (prompt and padding positions carry -100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_kd_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy of the student on teacher tokens, next-token shifted.

    Args:
        logits: (batch, seq, vocab) student logits; position t predicts token t+1.
        labels: (batch, seq) token ids, -100 where ignored (prompt, padding).
    Returns:
        (loss, n_tokens): the mean loss over unmasked positions (a scalar, natural log units),
        and the count of those positions (a scalar long tensor). A batch whose labels are all
        masked returns a loss of 0 that still depends on ``logits`` (no division by zero, and
        DDP sees a gradient for every parameter).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    n = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n.clamp(min=1), n
