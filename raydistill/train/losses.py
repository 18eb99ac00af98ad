"""Distillation losses: pure functions of tensors.

Two losses, chosen by ``train.loss``:

**Sequence-level KD** (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation",
arXiv:1606.07947): the student is trained with token cross-entropy on the teacher's generated
response, i.e.

    L = - (1 / N) * sum_{b, t : labels[b, t] != -100} log softmax(logits[b, t-1])[labels[b, t]]

where N is the number of unmasked label positions (prompt and padding positions carry -100).
``sequence_kd_loss`` returns that mean; ``distill_loss_sums`` without a teacher returns its sum.

**Logit KD** (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531): at every answer position the student's token distribution is pulled towards the
teacher's, mixed with the cross-entropy above:

    loss = alpha * KD_sum / kd_norm + (1 - alpha) * CE_sum / ce_norm            (``combine``)
    KD_sum = T² * sum_{(b, t) in kd_mask, t >= 1} D(p_bt, q_bt)

Shapes and alignment (B = batch, S = sequence, V = vocabulary, k = stored teacher entries):

- ``logits``: (B, S, V) student logits, unshifted: ``logits[b, t]`` predicts token ``t + 1``.
  Any float dtype (bf16 is fine); only a chunk of positions is ever cast to float32.
- ``labels``: (B, S) long token ids, -100 where ignored (prompt, padding). Shifted inside: the
  label at ``[b, t]`` is scored against ``logits[b, t - 1]``; position 0 has no predicting logit
  and is ignored, in ``labels`` and ``kd_mask`` alike.
- Offline (corpus) teacher: ``teacher_topk_ids`` (B, S, k) long and ``teacher_topk_logprobs``
  (B, S, k) float, **aligned with labels**: entry ``[b, t]`` is the teacher's distribution over
  token ``t`` (the one the student predicts from ``logits[b, t - 1]``). Rows with fewer than k
  entries are padded with logprob ``-inf`` (any id); those entries contribute exactly 0.
  ``kd_mask`` (B, S) bool marks positions that carry a teacher distribution; it must be a subset
  of ``labels != -100`` (default: labels != -100 and at least one finite logprob).
- Online teacher: ``teacher_logits`` is a (B, S, V) tensor aligned like ``logits`` (unshifted),
  or a callable ``(start, end) -> (B, end - start, V)`` giving the teacher logits of positions
  ``[start, end)`` of ``logits`` (so the caller can project the teacher's hidden states one chunk
  at a time). ``kd_mask`` defaults to ``labels != -100``. No gradient flows into the teacher.

The distributions, at temperature T:

- Offline: p = softmax(teacher_topk_logprobs / T) over the teacher's k ids (renormalized), and
  q = softmax(logits[ids] / T) over the SAME k ids. Online: p and q are the full-vocabulary
  softmaxes of the teacher's and student's logits divided by T.
- Divergences D (``divergence``): ``forward_kl`` = KL(p‖q) = Σ p (log p − log q) (mass-covering,
  Hinton et al.); ``reverse_kl`` = KL(q‖p) (mode-seeking, as in MiniLLM, Gu et al. 2024);
  ``jsd`` = the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
  Distillation of Language Models", arXiv:2306.13649, eq. 1), with m = β·p + (1 − β)·q:
  JSD(β) = β·KL(p‖m) + (1 − β)·KL(q‖m), 0 < β < 1. This is TRL's
  ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, ``trl/experimental/gkd/gkd_trainer.py``:
  the mixture adds ``log(beta)`` to the teacher's and ``log(1 - beta)`` to the student's
  log-probabilities). TRL special-cases β = 0 and β = 1 as plain KLs; here those are
  ``forward_kl`` and ``reverse_kl``. TRL does not multiply by T²; here every divergence is.
- T² (Hinton et al. 2015, section 2): the gradients of a divergence between softmax(z/T)
  distributions scale as 1/T², so the KD term is multiplied by T² to keep its weight against the
  cross-entropy independent of T. The cross-entropy always uses T = 1 and the full vocabulary.

**The probability mass outside the teacher's top k** (offline only). A corpus stores the teacher's
k largest log-probabilities, so the teacher's tail (the 1 − Σ exp(logprobs) it put on the other
V − k tokens) is known only as one number at T = 1, and at any other temperature it cannot be
rebuilt at all: the tail at T depends on how that mass is spread over the missing tokens. Within
the support, softmax(logprobs / T) is exact (the teacher's log-normalizer cancels). So both
distributions are renormalized over the teacher's top-k support: p and q are then proper
distributions on the same k points, every divergence above is well defined and ≥ 0, and its
gradient touches only the k student logits (no vocabulary-wide log-normalizer for this term).
What this drops: the student is not told how much mass to leave outside the k ids (the
cross-entropy term, over the full vocabulary, still constrains its overall shape). Sparse top-k KD
is what DistillKit does (arcee-ai/DistillKit, ``distillkit/lossfuncs/kl.py``; its default,
``MissingProbabilityHandling.ZERO``, renormalizes the teacher over the k ids but keeps the
student's full-vocabulary log-probabilities), and Anshumann et al. 2025 ("Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", ACL 2025, arXiv:2503.16870) prove that top-k
caching gives a biased estimate of the teacher's distribution (a student trained on it is worse
calibrated); their unbiased alternative stores importance-sampled tokens instead. The online
teacher has no such bias: its divergence is over the full vocabulary.

**Memory.** The sums are computed in chunks of ``chunk_size`` positions along the sequence, in
float32, by one autograd function that saves only references to its inputs (the student's logits,
in their own dtype, the labels and masks, the teacher's tensors) for backward. Backward recomputes
each chunk's float32 softmaxes and writes that chunk's analytic gradient (formulas in
``_kd_terms``; pinned against autograd in the tests) into one (B, S, V) tensor of ``logits``'
dtype, the gradient autograd would produce anyway. So no (B, S, V) float32 tensor beyond the
student's logits is created: the extra memory is that gradient plus a few (B, chunk_size, V)
float32 tensors at a time (about 7 for the online teacher, 3 without it). A callable online
teacher is therefore called twice per chunk when gradients are needed (forward, then again in
backward) and must give the same values both times. The teacher gets no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # = examples.IGNORE_INDEX (tests/test_train_loop.py); not imported: examples imports config

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

TeacherLogits = torch.Tensor | Callable[[int, int], torch.Tensor]


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


@dataclass
class LossSums:
    """Loss sums of one micro-batch (sums, not means: the trainer normalizes over a whole step).

    Attributes:
        ce_sum: float32 scalar, Σ over label positions (labels != -100, t >= 1) of the token
            cross-entropy −log softmax(logits[b, t-1])[labels[b, t]], in nats.
        ce_tokens: long scalar, the count of those positions.
        kd_sum: float32 scalar, Σ over KD positions of T² · D(p, q), in nats; 0 without a teacher.
        kd_tokens: long scalar, the count of KD positions; 0 without a teacher.
        kd_enabled: True when a teacher was given (``combine`` applies ``alpha`` only then).
    """
    ce_sum: torch.Tensor
    ce_tokens: torch.Tensor
    kd_sum: torch.Tensor
    kd_tokens: torch.Tensor
    kd_enabled: bool = False


def loss_token_counts(labels: torch.Tensor, kd_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ce_tokens, kd_tokens) that ``distill_loss_sums`` will report, from the labels alone.

    Lets a trainer all-reduce a step's token counts (the ``combine`` norms) before its forward
    passes. ``kd_mask`` None counts KD positions as the label positions (the online default; pass
    the corpus ``kd_mask`` for an offline teacher). Both are long scalars; position 0 is ignored.
    """
    ce = (labels[:, 1:] != IGNORE_INDEX).sum()
    kd = ce.clone() if kd_mask is None else kd_mask[:, 1:].sum()
    return ce, kd


def distill_loss_sums(logits: torch.Tensor, labels: torch.Tensor, *, kd_mask: torch.Tensor | None = None,
                      teacher_topk_ids: torch.Tensor | None = None,
                      teacher_topk_logprobs: torch.Tensor | None = None,
                      teacher_logits: TeacherLogits | None = None, temperature: float = 1.0,
                      divergence: str = "forward_kl", beta: float = 0.5, chunk_size: int = 256) -> LossSums:
    """Cross-entropy and logit-KD sums of one micro-batch, chunked along the sequence.

    See the module docstring for the formulas, the alignment of every tensor and the treatment of
    the mass outside the teacher's top k.

    Args:
        logits: (B, S, V) student logits (unshifted; any float dtype). Gradients flow to it.
        labels: (B, S) long, -100 where ignored.
        kd_mask: (B, S) bool, positions with a teacher distribution (aligned with labels; a subset
            of labels != -100). Default: offline, labels != -100 and some finite teacher logprob;
            online, labels != -100. Not allowed without a teacher.
        teacher_topk_ids: (B, S, k) integer, offline teacher's token ids (aligned with labels).
        teacher_topk_logprobs: (B, S, k) float, their log-probabilities; -inf marks padding.
        teacher_logits: online teacher, (B, S, V) tensor aligned with ``logits``, or a callable
            ``(start, end) -> (B, end - start, V)``. Exclusive with the top-k tensors.
        temperature: T > 0 of both distributions; the KD sum is scaled by T².
        divergence: "forward_kl" | "reverse_kl" | "jsd".
        beta: jsd only, 0 < beta < 1: weight of the teacher in the mixture.
        chunk_size: positions per chunk (≥ 1); bounds the float32 working memory to a few
            (B, chunk_size, V) tensors.
    Returns:
        ``LossSums`` with float32 sums and long counts, on ``logits.device``. Masked positions and
        rows contribute nothing; an all-masked batch gives zero sums that still depend on
        ``logits`` (its gradient is zero), so DDP sees a gradient for every parameter.
    Raises:
        ValueError: shapes that disagree (naming both), an unknown divergence, T ≤ 0, beta outside
            (0, 1) with jsd, chunk_size < 1, a kd_mask position whose label is -100, a KD position
            whose top-k logprobs are all -inf, a NaN or +inf logprob, or a top-k id outside
            [0, V) on a non-padding entry.
    """
    offline = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    online = teacher_logits is not None
    _validate(logits, labels, kd_mask, teacher_topk_ids, teacher_topk_logprobs, teacher_logits,
              temperature, divergence, beta, chunk_size)
    ce_mask = labels != IGNORE_INDEX
    ce_mask[:, 0] = False
    if offline:
        if kd_mask is None:
            kd_mask = ce_mask & torch.isfinite(teacher_topk_logprobs).any(-1)
        kd_mask = kd_mask.clone()
        kd_mask[:, 0] = False
        _check_topk(kd_mask, teacher_topk_ids, teacher_topk_logprobs, logits.size(-1))
    elif online:
        kd_mask = ce_mask.clone() if kd_mask is None else kd_mask.clone()
        kd_mask[:, 0] = False
    else:
        kd_mask = torch.zeros_like(ce_mask)
    teacher_tensor = teacher_logits if isinstance(teacher_logits, torch.Tensor) else None
    teacher_fn = teacher_logits if online and teacher_tensor is None else None
    ce_sum, kd_sum = _ChunkedDistill.apply(
        logits, labels, ce_mask, kd_mask, teacher_topk_ids, teacher_topk_logprobs, teacher_tensor,
        teacher_fn, float(temperature), divergence, float(beta), int(chunk_size))
    return LossSums(ce_sum=ce_sum, ce_tokens=ce_mask.sum(), kd_sum=kd_sum, kd_tokens=kd_mask.sum(),
                    kd_enabled=offline or online)


def combine(sums: LossSums, alpha: float, ce_norm, kd_norm) -> torch.Tensor:
    """The scalar to backpropagate: alpha·kd_sum/kd_norm + (1 − alpha)·ce_sum/ce_norm.

    Args:
        sums: one micro-batch's ``LossSums``.
        alpha: weight of the KD term in [0, 1]; applies only when ``sums.kd_enabled`` (without a
            teacher the result is ce_sum / ce_norm).
        ce_norm, kd_norm: the whole optimizer step's token counts (ints or scalar tensors, summed
            over micro-batches and all-reduced over workers by the caller); clamped to ≥ 1, so an
            all-masked step gives 0, not NaN.
    Returns:
        A float32 scalar; summing it over a step's micro-batches gives the step's token-mean loss,
        so batch 1 × 8 micro-batches equals batch 8 × 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = float(alpha) if sums.kd_enabled else 0.0
    ce_norm = torch.as_tensor(ce_norm, device=sums.ce_sum.device).clamp(min=1).to(sums.ce_sum.dtype)
    kd_norm = torch.as_tensor(kd_norm, device=sums.kd_sum.device).clamp(min=1).to(sums.kd_sum.dtype)
    return a * sums.kd_sum / kd_norm + (1.0 - a) * sums.ce_sum / ce_norm


# --- internals -------------------------------------------------------------------------------


def _shape(x) -> tuple:
    return tuple(x.shape)


def _validate(logits, labels, kd_mask, ids, lps, teacher_logits, temperature, divergence, beta, chunk_size):
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {_shape(logits)} (batch, seq, vocab) and labels {_shape(labels)} (batch, seq) "
                         "disagree on (batch, seq)")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for jsd, got {beta} (beta 0 and 1 are forward_kl and reverse_kl)")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    offline = ids is not None or lps is not None
    if offline and (ids is None or lps is None):
        raise ValueError("teacher_topk_ids and teacher_topk_logprobs come together; got only "
                         + ("teacher_topk_ids" if lps is None else "teacher_topk_logprobs"))
    if offline and teacher_logits is not None:
        raise ValueError("give either an offline teacher (teacher_topk_ids/teacher_topk_logprobs) or an online "
                         "one (teacher_logits), not both")
    if kd_mask is not None:
        if not offline and teacher_logits is None:
            raise ValueError("kd_mask given without a teacher (teacher_topk_* or teacher_logits)")
        if kd_mask.shape != labels.shape or kd_mask.dtype != torch.bool:
            raise ValueError(f"kd_mask {_shape(kd_mask)} {kd_mask.dtype} must be a bool tensor shaped like labels "
                             f"{_shape(labels)}")
        bad = (kd_mask[:, 1:] & (labels[:, 1:] == IGNORE_INDEX)).nonzero()
        if len(bad):
            b, t = bad[0].tolist()
            raise ValueError(f"kd_mask marks {len(bad)} position(s) whose label is -100 (first: row {b}, position "
                             f"{t + 1}); it must be a subset of labels != -100")
    if offline:
        want = (*labels.shape, ids.shape[-1] if ids.dim() == 3 else -1)
        if ids.dim() != 3 or ids.shape[:2] != labels.shape or lps.shape != ids.shape:
            raise ValueError(f"teacher_topk_ids {_shape(ids)} and teacher_topk_logprobs {_shape(lps)} must both be "
                             f"(batch, seq, k) = {want} to match labels {_shape(labels)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
        if not lps.is_floating_point():
            raise ValueError(f"teacher_topk_logprobs must be a float tensor, got {lps.dtype}")
        if ids.shape[-1] < 1:
            raise ValueError(f"teacher_topk_ids {_shape(ids)} has k = 0 entries per position")
    if isinstance(teacher_logits, torch.Tensor) and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits {_shape(teacher_logits)} must have the student's logits shape "
                         f"{_shape(logits)} (same batch, seq and vocabulary)")
    if teacher_logits is not None and not isinstance(teacher_logits, torch.Tensor) and not callable(teacher_logits):
        raise ValueError(f"teacher_logits must be a tensor or a callable (start, end) -> tensor, got "
                         f"{type(teacher_logits).__name__}")


def _check_topk(kd_mask, ids, lps, vocab):
    finite = torch.isfinite(lps)
    bad = (torch.isnan(lps) | (lps == math.inf)).nonzero()
    if len(bad):
        b, t, j = bad[0].tolist()
        raise ValueError(f"teacher_topk_logprobs holds {len(bad)} NaN or +inf value(s) (first: row {b}, position "
                         f"{t}, entry {j}: {lps[b, t, j].item()}); only -inf (padding) is allowed besides finite "
                         "values")
    empty = (kd_mask & ~finite.any(-1)).nonzero()
    if len(empty):
        b, t = empty[0].tolist()
        raise ValueError(f"kd_mask marks {len(empty)} position(s) whose teacher_topk_logprobs are all -inf (first: "
                         f"row {b}, position {t}): no teacher distribution there")
    out = (finite & ((ids < 0) | (ids >= vocab)) & kd_mask[..., None]).nonzero()
    if len(out):
        b, t, j = out[0].tolist()
        raise ValueError(f"teacher_topk_ids[{b}, {t}, {j}] = {ids[b, t, j].item()} is outside the student's vocabulary "
                         f"[0, {vocab}) ({len(out)} such entries)")


def _kd_terms(lp, lq, valid, divergence, beta, temperature, want_grad):
    """Per-position T²·D(p, q) and its gradient wrt the student's logits, from log-probabilities.

    lp, lq: (..., K) float32 log-probabilities of teacher and student over one support (K = k or V),
    already 0 at padding entries (``valid`` False), so no -inf reaches a product. Returns
    (value (...,), grad (..., K) or None). With q = softmax(z / T) and G = ∂D/∂q, the gradient wrt
    the logits z is (1/T)·q ⊙ (G − ⟨q, G⟩); times T² that is T·q ⊙ (G − ⟨q, G⟩), which gives
    T·(q − p) for KL(p‖q), T·q ⊙ (log q − log p − KL(q‖p)) for KL(q‖p), and, with
    H = (1 − β)(log q − log m), T·q ⊙ (H − ⟨q, H⟩) for JSD(β) (pinned against autograd in the tests).
    """
    p = lp.exp()
    q = lq.exp()
    if valid is not None:
        p.mul_(valid)
        q.mul_(valid)
    grad = None
    if divergence == "forward_kl":
        value = (p * (lp - lq)).sum(-1)
        if want_grad:
            grad = q.sub_(p)
    elif divergence == "reverse_kl":
        d = lq - lp
        value = (q * d).sum(-1)
        if want_grad:
            grad = d.sub_(value[..., None]).mul_(q)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))  # 0 at padding (log(β + 1 − β))
        value = beta * (p * (lp - lm)).sum(-1) + (1.0 - beta) * (q * (lq - lm)).sum(-1)
        if want_grad:
            h = lq.sub(lm).mul_(1.0 - beta)
            grad = h.sub_((q * h).sum(-1, keepdim=True)).mul_(q)
    t2 = temperature * temperature
    return value * t2, (grad.mul_(temperature) if want_grad else None)


def _chunk(x, lab, ce_m, kd_m, ids, lps, teacher, temperature, divergence, beta, g_ce=None, g_kd=None):
    """One chunk of positions. x: (B, c, V) logits of positions [s, e); lab, ce_m, kd_m (B, c) and
    ids, lps (B, c, k) are aligned with labels, i.e. positions [s + 1, e + 1); teacher: (B, c, V) logits
    of positions [s, e) or None; ce_m / kd_m None when the chunk has no such position.

    Every position of the chunk is computed and masked ones are multiplied by 0 (their inputs are
    made finite first), which is cheaper than gathering the unmasked rows. Without g_ce/g_kd: returns
    (ce_sum, kd_sum) float32 scalars. With them (backward): returns the float32 gradient (B, c, V) of
    g_ce·ce_sum + g_kd·kd_sum wrt x.
    """
    backward = g_ce is not None
    T = temperature
    x32 = x.float()  # a copy for bf16 logits; x itself for float32 (never modified in place)
    lse = torch.logsumexp(x32, -1, keepdim=True)                                   # (B, c, 1)
    ce = kd = x32.new_zeros(())
    grad = None
    if ce_m is not None:
        safe_lab = torch.where(ce_m, lab, 0).unsqueeze(-1)
        if backward:  # softmax − one-hot, at label positions only
            grad = torch.exp(x32 - lse)
            grad.scatter_add_(-1, safe_lab, torch.full_like(safe_lab, -1, dtype=grad.dtype))
            grad.mul_((ce_m * g_ce).unsqueeze(-1))
        else:
            ce = ((lse - x32.gather(-1, safe_lab)).squeeze(-1) * ce_m).sum()
    if kd_m is not None:
        if ids is not None:  # offline: renormalized over the teacher's top-k support
            vocab = x.size(-1)
            kd_pos = kd_m.unsqueeze(-1)
            lp = torch.where(kd_pos, lps.float(), 0.0)  # finite placeholders where there is no KD
            valid = torch.isfinite(lp)
            safe_ids = torch.where(valid, ids.long(), 0).clamp_(0, vocab - 1)
            neg_inf = torch.tensor(-math.inf, device=x.device)
            lp = torch.where(valid, torch.log_softmax(torch.where(valid, lp / T, neg_inf), -1), 0.0)
            s = x32.gather(-1, safe_ids)
            lq = torch.where(valid, torch.log_softmax(torch.where(valid, s / T, neg_inf), -1), 0.0)
            value, g = _kd_terms(lp, lq, valid, divergence, beta, T, backward)
            if backward:
                g.mul_((kd_m * g_kd).unsqueeze(-1))
                grad = torch.zeros_like(x32) if grad is None else grad
                grad.scatter_add_(-1, safe_ids, g)
        else:  # online: full vocabulary
            lq = x32 - lse if T == 1.0 else torch.log_softmax(x32 / T, -1)
            t32 = teacher.detach().float()
            lp = torch.log_softmax(t32 if T == 1.0 else t32 / T, -1)
            del t32
            value, g = _kd_terms(lp, lq, None, divergence, beta, T, backward)
            if backward:
                g.mul_((kd_m * g_kd).unsqueeze(-1))
                grad = g if grad is None else grad.add_(g)
        if not backward:
            kd = (value * kd_m).sum()
    if backward:
        return torch.zeros_like(x32) if grad is None else grad
    return ce, kd


class _ChunkedDistill(torch.autograd.Function):
    """Forward: the sums chunk by chunk, keeping nothing but references to the inputs. Backward:
    each chunk's float32 softmaxes recomputed and its analytic gradient written into one (B, S, V)
    tensor of ``logits``' dtype."""

    @staticmethod
    def forward(ctx, logits, labels, ce_mask, kd_mask, ids, lps, teacher, teacher_fn, temperature, divergence,
                beta, chunk_size):
        ctx.save_for_backward(logits, labels, ce_mask, kd_mask, ids, lps, teacher)
        ctx.args = (teacher_fn, temperature, divergence, beta, chunk_size)
        ce_total = logits.new_zeros((), dtype=torch.float32)
        kd_total = logits.new_zeros((), dtype=torch.float32)
        with _no_autocast(logits):
            for s, e, ce_m, kd_m in _chunks(ce_mask, kd_mask, chunk_size):
                ce, kd = _chunk(*_chunk_inputs(s, e, ce_m, kd_m, logits, labels, ids, lps, teacher, teacher_fn),
                                temperature, divergence, beta)
                ce_total += ce
                kd_total += kd
        return ce_total, kd_total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ce, g_kd):
        logits, labels, ce_mask, kd_mask, ids, lps, teacher = ctx.saved_tensors
        teacher_fn, temperature, divergence, beta, chunk_size = ctx.args
        grad = torch.zeros_like(logits)
        g_ce, g_kd = g_ce.float(), g_kd.float()
        with _no_autocast(logits), torch.no_grad():
            for s, e, ce_m, kd_m in _chunks(ce_mask, kd_mask, chunk_size):
                inputs = _chunk_inputs(s, e, ce_m, kd_m, logits, labels, ids, lps, teacher, teacher_fn)
                grad[:, s:e] = _chunk(*inputs, temperature, divergence, beta, g_ce=g_ce, g_kd=g_kd)
        return grad, *([None] * 11)


def _no_autocast(x):
    import contextlib

    if not torch.amp.is_autocast_available(x.device.type):  # a device without autocast: nothing to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _chunks(ce_mask, kd_mask, chunk_size):
    """(start, end, ce_m, kd_m) per chunk of logits positions [start, end) ⊂ [0, S - 1) holding any
    label position; ce_m / kd_m are the (B, end - start) masks (aligned with labels) or None when
    the chunk has none of that kind. Chunks without any position are skipped."""
    seq = ce_mask.shape[1]
    ce_any = ce_mask[:, 1:].any(0).tolist()  # one host sync for the whole batch
    kd_any = kd_mask[:, 1:].any(0).tolist()
    for s in range(0, seq - 1, chunk_size):
        e = min(s + chunk_size, seq - 1)
        has_ce, has_kd = any(ce_any[s:e]), any(kd_any[s:e])
        if has_ce or has_kd:
            yield s, e, ce_mask[:, s + 1:e + 1] if has_ce else None, kd_mask[:, s + 1:e + 1] if has_kd else None


def _chunk_inputs(s, e, ce_m, kd_m, logits, labels, ids, lps, teacher, teacher_fn):
    batch, vocab = logits.shape[0], logits.shape[-1]
    chunk_teacher = None
    if kd_m is not None:
        if teacher is not None:
            chunk_teacher = teacher[:, s:e]
        elif teacher_fn is not None:
            with torch.no_grad():
                chunk_teacher = teacher_fn(s, e)
            want = (batch, e - s, vocab)
            if not isinstance(chunk_teacher, torch.Tensor) or tuple(chunk_teacher.shape) != want:
                got = _shape(chunk_teacher) if isinstance(chunk_teacher, torch.Tensor) else type(chunk_teacher).__name__
                raise ValueError(f"teacher_logits({s}, {e}) returned {got}; expected (batch, end - start, vocab) = "
                                 f"{want} to match the student's logits {_shape(logits)}")
    return (logits[:, s:e], labels[:, s + 1:e + 1], ce_m, kd_m,
            None if ids is None else ids[:, s + 1:e + 1], None if lps is None else lps[:, s + 1:e + 1],
            chunk_teacher)
