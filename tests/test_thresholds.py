"""Thresholds a user can choose and the normalised score, against hand-computed values on known score lists."""

import math

import numpy as np
import pytest

from efficientad_jax.serving import thresholds

SCORES = [0.30, 0.10, 0.20, 0.50, 0.40, 0.60, 0.70, 0.80, 0.90, 1.00]  # 10 validation normals, unsorted


@pytest.mark.parametrize(
  "fpr,expected",
  [
    (0.0, 1.00),  # nothing above the largest score
    (0.05, 1.00),  # ceil(10 * 0.95) = 10: the 10th smallest
    (0.10, 0.90),  # ceil(9.0) = 9: one normal (1.00) above 0.90
    (0.25, 0.80),  # ceil(7.5) = 8: two above 0.80, 2 <= 2.5
    (0.50, 0.50),  # ceil(5) = 5: five above 0.50
    (0.99, 0.10),  # ceil(0.1) = 1: the smallest; nine above it
  ],
)
def test_fpr_threshold_by_hand(fpr, expected):
  t = thresholds.fpr_threshold(SCORES, fpr)
  assert t == pytest.approx(expected)
  flagged = sum(s > t for s in SCORES)
  assert flagged <= fpr * len(SCORES) + 1e-9  # the promise: at most that share of normals flagged
  # and it is the smallest such validation score: the next lower one would flag more than allowed
  lower = [s for s in sorted(SCORES) if s < t]
  if lower:
    assert sum(s > lower[-1] for s in SCORES) > fpr * len(SCORES)


def test_fpr_threshold_with_ties_flags_no_tied_normal():
  scores = [0.2, 0.5, 0.5, 0.5, 0.9]
  assert thresholds.fpr_threshold(scores, 0.3) == 0.5  # ceil(3.5) = 4th smallest; only 0.9 is above
  assert sum(s > 0.5 for s in scores) == 1


def test_choose_number_rate_or_saved():
  assert thresholds.choose(0.7, SCORES) == (0.7, "saved with the model (validation normals)")
  assert thresholds.choose(0.7, SCORES, threshold=0.25)[0] == 0.25
  t, rule = thresholds.choose(0.7, SCORES, fpr=0.1)
  assert t == pytest.approx(0.9) and "false-positive rate 0.1 on 10 validation normals" in rule
  with pytest.raises(thresholds.ThresholdError, match="not both"):
    thresholds.choose(0.7, SCORES, threshold=0.2, fpr=0.1)
  with pytest.raises(thresholds.ThresholdError, match="validation scores"):
    thresholds.choose(0.7, None, fpr=0.1)  # a model saved before the scores were recorded
  with pytest.raises(thresholds.ThresholdError, match=r"\[0, 1\)"):
    thresholds.choose(0.7, SCORES, fpr=1.0)
  with pytest.raises(thresholds.ThresholdError, match="finite"):
    thresholds.choose(0.7, SCORES, threshold=float("nan"))


def test_normalized_score_by_hand():
  median = thresholds.median(SCORES)
  assert median == pytest.approx(0.55)  # (0.50 + 0.60) / 2
  t = 0.95
  assert thresholds.normalized(median, median, t) == 0.0
  assert thresholds.normalized(t, median, t) == pytest.approx(0.5)
  assert thresholds.normalized(1.35, median, t) == pytest.approx(1.0)  # as far above t as t is above the median
  assert thresholds.normalized(0.15, median, t) == pytest.approx(-0.5)
  np.testing.assert_allclose(thresholds.normalized(np.array([0.55, 0.95]), median, t), [0.0, 0.5])
  assert math.isnan(thresholds.normalized(0.3, None, t))  # no validation scores: no scale
  assert math.isnan(thresholds.normalized(0.3, median, median))  # a threshold at the median: no scale
