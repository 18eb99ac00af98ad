"""The sequence-KD loss pinned against a naive loop written from the formula in its docstring."""

import math

import pytest
import torch

from raydistill.train.losses import IGNORE_INDEX, sequence_kd_loss


def naive_loss(logits, labels):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t - 1].double()
            log_z = math.log(sum(math.exp(float(v)) for v in row))
            total += -(float(row[y]) - log_z)
            n += 1
    return total / max(n, 1), n


def test_matches_naive_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    loss, n = sequence_kd_loss(logits, labels)
    want, want_n = naive_loss(logits, labels)
    assert int(n) == want_n
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_all_masked_batch_is_zero_and_differentiable():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss, n = sequence_kd_loss(logits, labels)
    assert int(n) == 0 and loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(2, 4\)"):
        sequence_kd_loss(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_gradient_lowers_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6))
    loss, _ = sequence_kd_loss(logits, labels)
    loss.backward()
    with torch.no_grad():
        new_loss, _ = sequence_kd_loss(logits - 0.5 * logits.grad, labels)
    assert new_loss.item() < loss.item()


# --- logit KD: distill_loss_sums / combine, pinned against naive loops over positions -------------

from raydistill.train.losses import combine, distill_loss_sums, loss_token_counts  # noqa: E402

B, S, V, K = 3, 7, 11, 4
NEG_INF = -math.inf


def make_batch(seed=0, k=K, dtype=torch.float32):
    """Student logits, labels, an offline top-k teacher (with padding) and an online teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, S, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    teacher_logits = 2 * torch.randn(B, S, V, generator=g)  # aligned with logits
    # the corpus teacher: top-k of the teacher's distribution over token t, i.e. of teacher_logits[:, t-1]
    full = torch.log_softmax(teacher_logits, -1)
    lps, ids = torch.full((B, S, k), NEG_INF), torch.full((B, S, k), -1, dtype=torch.long)
    top = full[:, :-1].topk(k, dim=-1)
    lps[:, 1:], ids[:, 1:] = top.values, top.indices
    lps[1, :, k - 1], ids[1, :, k - 1] = NEG_INF, 10**6  # row 1: fewer than k entries (junk padding id)
    lps[0, 5, 2:], ids[0, 5, 2:] = NEG_INF, -7
    kd_mask = labels != IGNORE_INDEX
    kd_mask[1, 4] = False  # a label position without a teacher distribution
    return logits, labels, kd_mask, ids, lps, teacher_logits


def kl(a, b):
    return sum(float(0) if a[i] == 0 else a[i] * (torch.log(a[i]) - torch.log(b[i])) for i in range(len(a)))


def naive_divergence(p, q, divergence, beta):
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def naive_sums(x, labels, *, kd_mask=None, ids=None, lps=None, teacher_logits=None, temperature=1.0,
               divergence="forward_kl", beta=0.5):
    """Straight from the module docstring, one position at a time, in float64 (x: the student's logits)."""
    T = temperature
    ce, n_ce, kd, n_kd = 0.0, 0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == IGNORE_INDEX:
                continue
            row = x[b, t - 1]
            ce = ce - torch.log(torch.exp(row[labels[b, t]]) / torch.exp(row).sum())
            n_ce += 1
            if kd_mask is not None and not kd_mask[b, t]:
                continue
            if ids is not None:
                keep = [j for j in range(ids.shape[-1]) if lps[b, t, j] != NEG_INF]
                tp = torch.exp(torch.stack([lps[b, t, j].double() / T for j in keep]))
                sq = torch.exp(torch.stack([row[ids[b, t, j]] / T for j in keep]))
            elif teacher_logits is not None:
                tp = torch.exp(teacher_logits[b, t - 1].double() / T)
                sq = torch.exp(row / T)
            else:
                continue
            kd = kd + T * T * naive_divergence(tp / tp.sum(), sq / sq.sum(), divergence, beta)
            n_kd += 1
    return ce, n_ce, kd, n_kd


DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher", ["offline", "online"])
@pytest.mark.parametrize("divergence,beta", DIVS)
def test_logit_kd_pinned_to_naive_reference(divergence, beta, teacher, temperature):
    logits, labels, kd_mask, ids, lps, t_logits = make_batch()
    if teacher == "offline":
        kw = dict(kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
        ref_kw = dict(kd_mask=kd_mask, ids=ids, lps=lps)
    else:
        kw = dict(teacher_logits=t_logits)
        ref_kw = dict(teacher_logits=t_logits)
    x = logits.clone().requires_grad_(True)
    sums = distill_loss_sums(x, labels, temperature=temperature, divergence=divergence, beta=beta, chunk_size=2, **kw)
    x64 = logits.double().requires_grad_(True)
    ce, n_ce, kd, n_kd = naive_sums(x64, labels, temperature=temperature, divergence=divergence, beta=beta, **ref_kw)
    assert sums.kd_enabled and int(sums.ce_tokens) == n_ce and int(sums.kd_tokens) == n_kd
    assert n_kd < n_ce if teacher == "offline" else n_kd == n_ce
    assert sums.ce_sum.dtype == torch.float32 and sums.kd_sum.dtype == torch.float32
    assert sums.ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)
    assert sums.kd_sum.item() == pytest.approx(kd.item(), rel=1e-5)
    # gradients wrt logits of an arbitrary mix of the two sums
    (grad,) = torch.autograd.grad(0.3 * sums.ce_sum + 0.7 * sums.kd_sum, x)
    (want,) = torch.autograd.grad(0.3 * ce + 0.7 * kd, x64)
    assert torch.allclose(grad.double(), want, atol=1e-6, rtol=1e-5)
    assert grad[0, :2].abs().sum() == 0 and grad[2, 4:].abs().sum() == 0  # masked positions get no gradient


def test_temperature_scales_by_t_squared():
    """kd_sum at T = 2 is 4 × the divergence between the T = 2 softened distributions."""
    logits, labels, kd_mask, ids, lps, t_logits = make_batch(seed=3)
    sums = distill_loss_sums(logits, labels, teacher_logits=t_logits, temperature=2.0)
    # the same divergence at T = 1 on logits / 2 is the unscaled divergence at T = 2
    half = distill_loss_sums(logits / 2, labels, teacher_logits=t_logits / 2, temperature=1.0)
    assert sums.kd_sum.item() == pytest.approx(4 * half.kd_sum.item(), rel=1e-5)
    assert sums.ce_sum.item() == pytest.approx(distill_loss_sums(logits, labels).ce_sum.item(), rel=1e-6)  # CE at T=1
    off2 = distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                             temperature=2.0)
    off1 = distill_loss_sums(logits / 2, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps / 2)
    assert off2.kd_sum.item() == pytest.approx(4 * off1.kd_sum.item(), rel=1e-5)


def _sums_and_grad(logits, labels, **kw):
    x = logits.clone().requires_grad_(True)
    sums = distill_loss_sums(x, labels, **kw)
    (grad,) = torch.autograd.grad(0.6 * sums.ce_sum + 0.4 * sums.kd_sum, x)
    return sums, grad


@pytest.mark.parametrize("teacher", ["offline", "online"])
def test_chunk_size_does_not_change_results(teacher):
    logits, labels, kd_mask, ids, lps, t_logits = make_batch(seed=1)
    kw = (dict(kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps) if teacher == "offline"
          else dict(teacher_logits=t_logits))
    results = [_sums_and_grad(logits, labels, divergence="jsd", beta=0.3, temperature=1.5, chunk_size=c, **kw)
               for c in (1, 3, S, 10 * S)]
    (ref, ref_grad), *others = results
    for sums, grad in others:
        assert torch.allclose(sums.ce_sum, ref.ce_sum, rtol=1e-6) and torch.allclose(sums.kd_sum, ref.kd_sum, rtol=1e-6)
        assert torch.equal(sums.kd_tokens, ref.kd_tokens) and torch.equal(sums.ce_tokens, ref.ce_tokens)
        assert torch.allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_callable_teacher_equals_tensor_teacher():
    logits, labels, _, _, _, t_logits = make_batch(seed=2)
    calls = []

    def teacher(start, end):
        calls.append((start, end))
        return t_logits[:, start:end]

    by_tensor, g_tensor = _sums_and_grad(logits, labels, teacher_logits=t_logits, divergence="reverse_kl", chunk_size=3)
    by_call, g_call = _sums_and_grad(logits, labels, teacher_logits=teacher, divergence="reverse_kl", chunk_size=3)
    assert torch.equal(by_call.kd_sum, by_tensor.kd_sum) and torch.equal(by_call.ce_sum, by_tensor.ce_sum)
    assert torch.equal(g_call, g_tensor)
    # chunks of logits positions [0, S-1): once in forward, once more in backward; never past S - 1
    assert sorted(set(calls)) == [(0, 3), (3, 6)] and len(calls) == 4


def test_callable_teacher_with_wrong_shape_is_an_error():
    logits, labels, *_ = make_batch()
    with pytest.raises(ValueError, match=r"teacher_logits\(0, 3\) returned \(3, 3, 12\).*\(3, 3, 11\)"):
        distill_loss_sums(logits, labels, teacher_logits=lambda s, e: torch.zeros(B, e - s, V + 1), chunk_size=3)


@pytest.mark.parametrize("teacher", ["offline", "online"])
def test_all_masked_row_contributes_nothing(teacher):
    logits, labels, kd_mask, ids, lps, t_logits = make_batch(seed=4)
    g = torch.Generator().manual_seed(9)
    cat = lambda a, extra: torch.cat([a, extra[None]])  # noqa: E731
    big = dict(logits=cat(logits, torch.randn(S, V, generator=g)), labels=cat(labels, torch.full((S,), IGNORE_INDEX)))
    if teacher == "offline":
        kw = dict(kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
        big_kw = dict(kd_mask=cat(kd_mask, torch.zeros(S, dtype=torch.bool)),
                      teacher_topk_ids=cat(ids, torch.randint(0, V, (S, K), generator=g)),
                      teacher_topk_logprobs=cat(lps, torch.full((S, K), NEG_INF)))  # even an empty teacher row
    else:
        kw = dict(teacher_logits=t_logits)
        big_kw = dict(teacher_logits=cat(t_logits, torch.randn(S, V, generator=g)))
    small, g_small = _sums_and_grad(logits, labels, **kw)
    large, g_large = _sums_and_grad(big["logits"], big["labels"], **big_kw)
    for f in ("ce_sum", "kd_sum", "ce_tokens", "kd_tokens"):
        assert torch.allclose(getattr(large, f), getattr(small, f), rtol=1e-6), f
    assert torch.allclose(g_large[:B], g_small, rtol=1e-6, atol=1e-7)
    assert torch.all(g_large[B] == 0) and torch.isfinite(g_large).all()


@pytest.mark.parametrize("teacher", ["offline", "online", "none"])
def test_all_masked_batch_gives_zero_sums_that_depend_on_logits(teacher):
    logits, _, _, ids, lps, t_logits = make_batch()
    labels = torch.full((B, S), IGNORE_INDEX)
    kw = {"offline": dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps), "online": dict(teacher_logits=t_logits),
          "none": {}}[teacher]
    x = logits.clone().requires_grad_(True)
    sums = distill_loss_sums(x, labels, **kw)
    assert sums.ce_sum.item() == 0 and sums.kd_sum.item() == 0 and int(sums.ce_tokens) == int(sums.kd_tokens) == 0
    loss = combine(sums, 0.5, sums.ce_tokens, sums.kd_tokens)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_padded_topk_entries_contribute_nothing():
    logits, labels, kd_mask, ids, lps, _ = make_batch(seed=5)
    base, g_base = _sums_and_grad(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                  divergence="jsd")
    # three more entries per position: -inf logprobs with junk ids (in range, negative, past the vocabulary)
    pad_ids = torch.tensor([3, -1, V + 5]).expand(B, S, 3)
    wide, g_wide = _sums_and_grad(logits, labels, kd_mask=kd_mask, teacher_topk_ids=torch.cat([ids, pad_ids], -1),
                                  teacher_topk_logprobs=torch.cat([lps, torch.full((B, S, 3), NEG_INF)], -1),
                                  divergence="jsd")
    assert torch.allclose(wide.kd_sum, base.kd_sum, rtol=1e-6) and torch.allclose(g_wide, g_base, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(g_wide).all()
    # the student's logit at a padding id changes nothing either (only real entries form q)
    ids2, moved = ids.clone(), logits.clone()
    for t in range(1, S):
        free = next(j for j in range(V) if j not in ids[1, t, :K - 1].tolist())  # not a real entry here
        ids2[1, t, K - 1] = free
        moved[1, t - 1, free] += 5.0
    kw = dict(kd_mask=kd_mask, teacher_topk_logprobs=lps, divergence="reverse_kl")
    before = distill_loss_sums(logits, labels, teacher_topk_ids=ids, **kw)
    after = distill_loss_sums(moved, labels, teacher_topk_ids=ids2, **kw)
    assert after.kd_sum.item() == pytest.approx(before.kd_sum.item(), rel=1e-6)
    assert after.ce_sum.item() != pytest.approx(before.ce_sum.item(), rel=1e-6)  # the CE does see those logits


def test_combine_alpha_zero_is_ce_mean_and_one_is_kd_mean():
    logits, labels, kd_mask, ids, lps, _ = make_batch(seed=6)
    sums = distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    ce_mean, n = sequence_kd_loss(logits, labels)
    assert int(n) == int(sums.ce_tokens)
    assert combine(sums, 0.0, sums.ce_tokens, sums.kd_tokens).item() == pytest.approx(ce_mean.item(), rel=1e-6)
    kd_mean = sums.kd_sum.item() / int(sums.kd_tokens)
    assert combine(sums, 1.0, sums.ce_tokens, sums.kd_tokens).item() == pytest.approx(kd_mean, rel=1e-6)
    mixed = combine(sums, 0.25, sums.ce_tokens, sums.kd_tokens).item()
    assert mixed == pytest.approx(0.25 * kd_mean + 0.75 * ce_mean.item(), rel=1e-6)
    # without a teacher, alpha is ignored: the loss is the CE mean (sequence KD)
    plain = distill_loss_sums(logits, labels)
    assert not plain.kd_enabled and plain.kd_sum.item() == 0 and int(plain.kd_tokens) == 0
    assert combine(plain, 0.7, plain.ce_tokens, 1).item() == pytest.approx(ce_mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha must be in"):
        combine(sums, 1.5, 1, 1)


def test_micro_batches_with_step_norms_equal_one_batch():
    """Σ over micro-batches of combine(…, step norms) = combine of the whole batch (gradient accumulation)."""
    logits, labels, kd_mask, ids, lps, _ = make_batch(seed=7)
    kw = lambda sl: dict(kd_mask=kd_mask[sl], teacher_topk_ids=ids[sl], teacher_topk_logprobs=lps[sl])  # noqa: E731
    whole = logits.clone().requires_grad_(True)
    s = distill_loss_sums(whole, labels, **kw(slice(None)))
    combine(s, 0.5, s.ce_tokens, s.kd_tokens).backward()
    ce_norm, kd_norm = loss_token_counts(labels, kd_mask)
    assert int(ce_norm) == int(s.ce_tokens) and int(kd_norm) == int(s.kd_tokens)
    parts, total = logits.clone().requires_grad_(True), 0.0
    for b in range(B):
        sl = slice(b, b + 1)
        loss = combine(distill_loss_sums(parts[sl], labels[sl], **kw(sl)), 0.5, ce_norm, kd_norm)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(combine(s, 0.5, s.ce_tokens, s.kd_tokens).item(), rel=1e-6)
    assert torch.allclose(parts.grad, whole.grad, rtol=1e-5, atol=1e-8)


def test_full_topk_forward_kl_equals_online_full_vocab():
    logits, labels, _, _, _, t_logits = make_batch(seed=8)
    full = torch.log_softmax(t_logits, -1)
    ids, lps = torch.zeros(B, S, V, dtype=torch.long), torch.zeros(B, S, V)
    order = full[:, :-1].sort(-1, descending=True)
    lps[:, 1:], ids[:, 1:] = order.values, order.indices  # k = V: every token, teacher aligned with labels
    offline, g_off = _sums_and_grad(logits, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    online, g_on = _sums_and_grad(logits, labels, teacher_logits=t_logits)
    assert int(offline.kd_tokens) == int(online.kd_tokens)
    a = combine(offline, 1.0, offline.ce_tokens, offline.kd_tokens)
    b = combine(online, 1.0, online.ce_tokens, online.kd_tokens)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert torch.allclose(g_off, g_on, rtol=1e-4, atol=1e-6)


def test_no_float32_vocab_sized_tensor_is_saved_for_backward_with_bf16_logits():
    """The memory claim: with bf16 logits, autograd keeps no float32 tensor of the logits' size.

    Every tensor saved for backward passes through the pack hook; a naive loss (the full-vocabulary
    float32 log-softmax of sequence_kd_loss) is caught by the same hook, so the check is not vacuous.
    """
    b, s, v, k = 2, 32, 256, 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, s, v, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (b, s), generator=g)
    t_logits = torch.randn(b, s, v, generator=g).to(torch.bfloat16)
    top = torch.log_softmax(t_logits.float(), -1).topk(k, -1)
    big = b * (s - 1) * v // 2  # half the logits' elements: far above one chunk (b × 4 × v)

    def float32_big_saved(fn):
        seen = []

        def pack(t):
            if t.dtype == torch.float32 and t.numel() >= big:
                seen.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return seen, out

    for kw in (dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values),
               dict(teacher_logits=t_logits), dict(teacher_logits=lambda st, en: t_logits[:, st:en]), {}):
        seen, sums = float32_big_saved(lambda: distill_loss_sums(logits, labels, chunk_size=4, divergence="jsd", **kw))
        assert seen == [], (list(kw), seen)
        combine(sums, 0.5, sums.ce_tokens, sums.kd_tokens).backward()
        assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
        logits.grad = None
    seen, _ = float32_big_saved(lambda: sequence_kd_loss(logits, labels))
    assert seen, "the hook should catch the naive float32 log-softmax"


def test_loss_token_counts_match_the_sums():
    logits, labels, kd_mask, ids, lps, t_logits = make_batch(seed=10)
    labels[1, 0] = 5  # position 0 is never counted: no logit predicts it
    off = distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    on = distill_loss_sums(logits, labels, teacher_logits=t_logits)
    ce, kd = loss_token_counts(labels, kd_mask)
    assert (int(ce), int(kd)) == (int(off.ce_tokens), int(off.kd_tokens))
    ce, kd = loss_token_counts(labels)
    assert (int(ce), int(kd)) == (int(on.ce_tokens), int(on.kd_tokens))


def test_logit_kd_input_errors_name_the_shapes():
    logits, labels, kd_mask, ids, lps, t_logits = make_batch()
    with pytest.raises(ValueError, match=r"\(3, 7, 4\).*\(3, 7, 3\)"):
        distill_loss_sums(logits, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lps[..., :3])
    with pytest.raises(ValueError, match=r"teacher_logits \(3, 7, 12\).*\(3, 7, 11\)"):
        distill_loss_sums(logits, labels, teacher_logits=torch.randn(B, S, V + 1))
    with pytest.raises(ValueError, match=r"logits \(3, 7, 11\).*labels \(3, 6\)"):
        distill_loss_sums(logits, labels[:, :6])
    with pytest.raises(ValueError, match=r"kd_mask \(3, 6\)"):
        distill_loss_sums(logits, labels, kd_mask=kd_mask[:, :6], teacher_logits=t_logits)
    with pytest.raises(ValueError, match="not both"):
        distill_loss_sums(logits, labels, teacher_topk_ids=ids, teacher_topk_logprobs=lps, teacher_logits=t_logits)
    with pytest.raises(ValueError, match="come together"):
        distill_loss_sums(logits, labels, teacher_topk_ids=ids)
    with pytest.raises(ValueError, match="without a teacher"):
        distill_loss_sums(logits, labels, kd_mask=kd_mask)
    with pytest.raises(ValueError, match="divergence must be one of"):
        distill_loss_sums(logits, labels, teacher_logits=t_logits, divergence="kl")
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        distill_loss_sums(logits, labels, teacher_logits=t_logits, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss_sums(logits, labels, teacher_logits=t_logits, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        distill_loss_sums(logits, labels, teacher_logits=t_logits, chunk_size=0)


def test_corpus_teacher_data_errors_name_the_row_and_position():
    logits, labels, kd_mask, ids, lps, _ = make_batch()
    bad_mask = kd_mask.clone()
    bad_mask[0, 1] = True  # a prompt position
    with pytest.raises(ValueError, match=r"whose label is -100 \(first: row 0, position 1\)"):
        distill_loss_sums(logits, labels, kd_mask=bad_mask, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    empty = lps.clone()
    empty[2, 3] = NEG_INF
    with pytest.raises(ValueError, match=r"all -inf \(first: row 2, position 3\)"):
        distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=empty)
    # without kd_mask such a position is simply not a KD position
    sums = distill_loss_sums(logits, labels, teacher_topk_ids=ids, teacher_topk_logprobs=empty)
    assert int(sums.kd_tokens) == int(loss_token_counts(labels)[0]) - 1
    far = ids.clone()
    far[2, 3, 0] = V
    with pytest.raises(ValueError, match=r"teacher_topk_ids\[2, 3, 0\] = 11 is outside the student's vocabulary"):
        distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=far, teacher_topk_logprobs=lps)
    nan = lps.clone()
    nan[1, 2, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf.*row 1, position 2, entry 1"):
        distill_loss_sums(logits, labels, kd_mask=kd_mask, teacher_topk_ids=ids, teacher_topk_logprobs=nan)
