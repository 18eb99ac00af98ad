"""Helpers shared by the test modules (no fixtures: those are in conftest.py). A test module
imports from here or from conftest, never from another test module."""

from __future__ import annotations

import torch


def assert_same_weights(sa: dict, sb: dict) -> None:
    """Equal up to float rounding amplified by AdamW: its update is about lr · g / |g| per element,
    so where a gradient is near 0 the summation-order noise of the two batchings flips it (measured:
    9 of 430,720 elements differ by more than 1e-5, at most 4.8e-5, after 3 steps at lr 1e-2 that
    moved the weights by 0.013 on average)."""
    diffs = torch.cat([(sa[n] - sb[n]).abs().flatten() for n in sa])
    assert diffs.max().item() < 1e-4, diffs.max().item()
    assert (diffs > 1e-5).float().mean().item() < 1e-4, int((diffs > 1e-5).sum())
