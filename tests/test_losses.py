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
