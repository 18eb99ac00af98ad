"""The intermediate-layer (hidden-state) loss against a naive token-by-token reference: value and gradient."""

from __future__ import annotations

import pytest
import torch

from raydistill.train.hidden import hidden_state_loss, make_projections


def _naive(student, teacher, mask, kind, projections=None):
    """The module docstring's formula, one token at a time, in float64."""
    per_layer = []
    for layer, (s, t) in enumerate(zip(student, teacher)):
        terms = []
        for b in range(mask.shape[0]):
            for i in range(mask.shape[1]):
                if not mask[b, i]:
                    continue
                x = s[b, i].double()
                if projections is not None:
                    x = projections[layer].weight.double() @ x
                y = t[b, i].detach().double()
                if kind == "cosine":
                    terms.append(1 - (x @ y) / (x.norm() * y.norm()))
                else:
                    terms.append(((x - y) ** 2).sum() / y.numel())
        per_layer.append(sum(terms) / len(terms))
    return sum(per_layer) / len(per_layer)


def _case(width_s, width_t, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(2, 5, width_s, generator=g, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, width_t, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return student, teacher, mask


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("widths", [(8, 8), (6, 10)])
def test_hidden_state_loss_matches_the_naive_reference_in_value_and_gradient(kind, widths):
    student, teacher, mask = _case(*widths)
    torch.manual_seed(1)
    projections = make_projections(3, *widths)
    assert (projections is None) == (widths[0] == widths[1])
    loss = hidden_state_loss(student, teacher, mask, kind, projections)
    params = [*student, *(projections.parameters() if projections is not None else [])]
    grads = torch.autograd.grad(loss, params)
    ref = _naive(student, teacher, mask, kind, projections)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-6)
    # padding positions get no gradient; the teacher none at all
    assert all(float(g[0, 3:].abs().sum()) == 0 for g in grads[:3])
    loss = hidden_state_loss(student, teacher, mask, kind, projections)
    loss.backward()
    assert all(t.grad is None for t in teacher)


def test_identical_hidden_states_cost_nothing():
    student, _, mask = _case(8, 8)
    same = [s.detach().clone() for s in student]
    for kind in ("cosine", "mse"):
        assert hidden_state_loss(student, same, mask, kind).item() == pytest.approx(0.0, abs=1e-6)


def test_mismatches_are_clear_errors():
    student, teacher, mask = _case(6, 10)
    with pytest.raises(ValueError, match="width 6 against the teacher's 10; pass projections"):
        hidden_state_loss(student, teacher, mask)
    with pytest.raises(ValueError, match="3 student layers against 2 teacher layers"):
        hidden_state_loss(student, teacher[:2], mask, projections=make_projections(3, 6, 10))
    with pytest.raises(ValueError, match="the mask selects no token"):
        hidden_state_loss(student, teacher, torch.zeros_like(mask), projections=make_projections(3, 6, 10))
    with pytest.raises(ValueError, match="unknown kind 'l1'"):
        hidden_state_loss(student, teacher, mask, "l1", make_projections(3, 6, 10))
