"""The A/B routing rule of ``raydistill serve``: which arm answers a ``model: "ab"`` request
(``pick_arm``: sticky per user, weighted by ``serve.ab.weights``) and how a request reached its arm
(``request_via``, the ``via`` tag of the per-arm metrics). Pure functions of the request and the
config: the ingress applies them (``serve.ingress``); nothing here serves or sends requests.
"""

from __future__ import annotations

import hashlib
import random

from ..config import ABConfig
from . import AB_MODEL, ARMS


def pick_arm(ab: ABConfig, user: str | None, rng: random.Random | None = None) -> str:
    """The arm (``"teacher"`` or ``"student"``) that answers one ``model: "ab"`` request.

    ``u`` in [0, 1) is ``sha256(f"{ab.seed}:{user}")`` read as a fraction (first 8 bytes / 2**64),
    or a random draw when ``user`` is None or empty; the arm is the first of ``ARMS`` whose cumulative
    normalized weight exceeds ``u``. So one user always lands on one arm, an arm of weight 0 never
    answers, and over many users each arm's share tends to its weight. Arms missing from
    ``ab.weights`` weigh 0.
    """
    if user:
        u = int.from_bytes(hashlib.sha256(f"{ab.seed}:{user}".encode()).digest()[:8], "big") / 2**64
    else:
        u = (rng or random).random()
    total = sum(ab.weights.get(a, 0.0) for a in ARMS)
    cum = 0.0
    for arm in ARMS:
        cum += ab.weights.get(arm, 0.0) / total
        if u < cum:
            return arm
    return next(a for a in reversed(ARMS) if ab.weights.get(a, 0.0) > 0)  # u within rounding of 1


def request_via(model: str | None) -> str:
    """How a request reached its arm, the ``via`` tag of the per-arm metrics: ``"ab"`` when it asked
    for ``model: "ab"`` (an A/B user; ``pick_arm`` chose), else ``"direct"`` (it named the arm:
    ``bench-serve``, evaluate, any direct caller). A/B figures are those with ``via="ab"``."""
    return "ab" if model == AB_MODEL else "direct"
