"""raydistill.stats: the percentile and ratio of every report."""

import numpy as np
import pytest

from raydistill.stats import percentile, ratio


@pytest.mark.parametrize("values", [[0.31, 5.0, 1.2, 1.2, 9.75, 2.0, 3.3], [3, 1, 2], [2.5, -1.0], list(range(101))])
def test_percentile_is_numpys_linear_default(values):
    for q in (0, 1, 2.5, 25, 50, 90, 95, 99, 99.9, 100):
        got = percentile(values, q)
        assert isinstance(got, float)
        assert got == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_no_values_and_of_one_value():
    assert percentile([], 50) is None
    assert percentile([4.0], 0) == percentile([4.0], 99) == percentile([4.0], 100) == 4.0


def test_percentile_leaves_its_input_alone():
    values = [3.0, 1.0, 2.0]
    assert percentile(values, 50) == 2.0 and values == [3.0, 1.0, 2.0]


def test_ratio_is_none_when_a_figure_is_missing_or_the_denominator_zero():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.0, 2.0) == 0.0
    assert ratio(None, 2.0) is None and ratio(3.0, None) is None and ratio(None, None) is None
    assert ratio(3.0, 0) is None and ratio(3.0, 0.0) is None
    assert ratio(-3.0, 2.0) == -1.5
