"""Intermediate-layer matching: a loss between a pruned student's hidden states and the teacher's.

A student pruned from the teacher (``student.init: prune``) keeps teacher layers ``kept[0] <
kept[1] < ...``; student layer ``j`` is teacher layer ``kept[j]``. The loss pulls the output of
student layer ``j`` towards the output of teacher layer ``kept[j]`` on the same tokens, so the
shortened network keeps the teacher's intermediate representations, not only its final
distribution (TinyBERT: Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding", arXiv:1909.10351, eq. 7, the MSE between hidden states with a learned linear map
``W_h`` when the widths differ; DistilBERT: Sanh et al. 2019, arXiv:1910.01108, the cosine loss
between hidden states). Shapes (B = batch, S = sequence, d_s / d_t = student / teacher width):

- ``student_hidden``: L tensors (B, S, d_s), the outputs of the student's layers (any subset,
  paired in order with ``teacher_hidden``).
- ``teacher_hidden``: L tensors (B, S, d_t), the outputs of the matching teacher layers; no
  gradient flows into them.
- ``mask``: (B, S) bool, the tokens that count (padding excluded); at least one must be true.
- ``projections``: None when d_s == d_t, else L ``nn.Linear(d_s, d_t, bias=False)`` (learned
  with the student; ``make_projections``).

The loss, averaged over layers ``l`` and counted tokens ``n`` (N of them):

- ``cosine``: ``(1 / L) Σ_l (1 / N) Σ_n (1 − cos(W_l s_ln, t_ln))``
- ``mse``: ``(1 / L) Σ_l (1 / (N · d_t)) Σ_n ‖W_l s_ln − t_ln‖²``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

HiddenKind = Literal["cosine", "mse"]


def make_projections(num_layers: int, student_width: int, teacher_width: int) -> nn.ModuleList | None:
    """The learned maps from the student's width to the teacher's (one per matched layer), or None
    when the widths are equal (a depth-pruned student keeps the teacher's width). Initialised as
    PyTorch's ``nn.Linear`` default."""
    if student_width == teacher_width:
        return None
    return nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(num_layers))


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      mask: torch.Tensor, kind: HiddenKind = "cosine",
                      projections: nn.ModuleList | None = None) -> torch.Tensor:
    """The intermediate-layer loss (module docstring), a float32 scalar with a gradient into
    ``student_hidden`` and ``projections``. Raises ValueError for unmatched layer counts or shapes,
    an unknown ``kind`` or a mask with no token."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden-state loss: {len(student_hidden)} student layers against {len(teacher_hidden)} "
                         "teacher layers")
    if kind not in ("cosine", "mse"):
        raise ValueError(f"hidden-state loss: unknown kind {kind!r} (cosine or mse)")
    if projections is not None and len(projections) != len(student_hidden):
        raise ValueError(f"hidden-state loss: {len(projections)} projections for {len(student_hidden)} layers")
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        raise ValueError("hidden-state loss: the mask selects no token")
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for layer, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        if s.shape[:2] != m.shape or t.shape[:2] != m.shape:
            raise ValueError(f"hidden-state loss: layer {layer}: student {tuple(s.shape)} and teacher "
                             f"{tuple(t.shape)} do not match the mask {tuple(m.shape)}")
        x = s[m].float()  # (N, d_s)
        y = t[m].detach().float()  # (N, d_t)
        if projections is not None:
            x = projections[layer](x.to(projections[layer].weight.dtype)).float()
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"hidden-state loss: layer {layer}: width {x.shape[-1]} against the teacher's "
                             f"{y.shape[-1]}; pass projections (make_projections)")
        if kind == "cosine":
            total = total + (1 - nn.functional.cosine_similarity(x, y, dim=-1)).mean()
        else:
            total = total + ((x - y) ** 2).mean()
    return total / len(student_hidden)
