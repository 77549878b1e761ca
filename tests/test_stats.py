"""ctpo.stats: the torch-free statistics the trainer, the diagnostics and the analysis share."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from ctpo import stats


def test_fit_sqrt_recovers_an_exact_curve_and_ignores_thin_buckets():
    t = np.arange(1.0, 101.0)
    assert stats.fit_sqrt(t, 0.3 * np.sqrt(t)) == pytest.approx((0.3, 1.0))
    count = np.where(t > 50, 1, 10)  # the off-curve half has one token per bucket: left out
    assert stats.fit_sqrt(t, np.where(t > 50, 99.0, 0.3 * np.sqrt(t)), count) == pytest.approx((0.3, 1.0))
    assert all(math.isnan(x) for x in stats.fit_sqrt(np.array([4.0]), np.array([1.0])))


def test_paired_se_by_hand():
    # d = (1, 2, 3, 6): mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, SE = sqrt(14/3 / 4)
    assert stats.paired_se(np.array([1.0, 2.0, 3.0, 6.0])) == pytest.approx(math.sqrt(14 / 12))
    assert math.isnan(stats.paired_se(np.array([1.0])))


def test_populated_count_is_a_fraction_of_the_first_position_but_at_least_two():
    assert stats.populated_count(160) == pytest.approx(40.0)
    assert stats.populated_count(4) == 2.0


def test_the_bottom_layer_does_not_import_torch_or_the_analysis():
    code = "import sys, ctpo.stats; assert 'torch' not in sys.modules and 'ctpo.analysis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
