"""Small arithmetic shared by the reports (evaluate's, bench-serve's): percentiles and ratios
that answer None instead of failing on missing figures. Plain Python (no numpy import); it
knows nothing of what the figures are.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0–100), as ``numpy.percentile``'s default (method
    ``linear``: position ``(n - 1) * q / 100`` in the sorted values, interpolated between its two
    neighbours); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing or b is 0."""
    if a is None or b is None or not b:
        return None
    return a / b
