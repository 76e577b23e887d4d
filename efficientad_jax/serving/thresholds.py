"""Decision thresholds a user can choose, and a score that says where an image stands (docs/method.md §7.4).

An image is anomalous when its score > threshold. The saved model keeps the threshold of its rule (the
`maps.threshold_quantile` quantile, 0.99, of the validation normals' scores) and those scores themselves
(`meta['validation_scores']`), so that a threshold can also be chosen later:

  * a number (`--threshold 0.2`);
  * a false-positive rate on the validation normals (`--fpr 0.01`): the smallest validation score t such that
    at most a fraction fpr of the validation normals score above t (`fpr_threshold`).

The normalised score maps the validation normals' median to 0 and the threshold in use to 0.5,
`0.5 * (score - median) / (threshold - median)`: above 0.5 is anomalous, 1.0 is as far above the threshold as the
threshold is above a typical normal image. NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NORMALIZED = "0.5 * (score - validation_median) / (threshold - validation_median)"  # as exported metadata say


class ThresholdError(ValueError):
  """A threshold that cannot be chosen as asked (no validation scores saved, a rate out of range)."""


def fpr_threshold(validation_scores: Sequence[float], fpr: float) -> float:
  """The smallest validation score t with #(scores > t) <= fpr * n: at most that share of normals is flagged.

  With the scores sorted s_1 <= ... <= s_n, t = s_k for k = ceil(n * (1 - fpr)) (k >= 1), so the n - k scores
  above it are at most fpr * n (ties at t are not flagged, since the decision is score > t).
  """
  if not 0 <= fpr < 1:
    raise ThresholdError(f"--fpr {fpr}: the false-positive rate must be in [0, 1)")
  scores = np.sort(np.asarray(validation_scores, np.float64))
  if not len(scores):
    raise ThresholdError("the model holds no validation scores to choose a threshold by false-positive rate from")
  # The 1e-12 keeps float error from rounding up: 10 * (1 - 0.1) is 9.000000000000002 in binary, and the rule wants 9.
  k = max(1, math.ceil(len(scores) * (1 - fpr) - 1e-12))
  return float(scores[k - 1])


def choose(
  saved: float, validation_scores: Sequence[float] | None, *, threshold: float | None = None, fpr: float | None = None
) -> tuple[float, str]:
  """(threshold, how it was chosen) from a number, a false-positive rate, or else the saved threshold."""
  if threshold is not None and fpr is not None:
    raise ThresholdError("give --threshold or --fpr, not both")
  if threshold is not None:
    if not math.isfinite(threshold):
      raise ThresholdError(f"--threshold {threshold}: give a finite number")
    return float(threshold), f"given: {threshold:g}"
  if fpr is not None:
    if validation_scores is None:
      raise ThresholdError(
        "--fpr needs the validation scores, which models saved before they were recorded lack: "
        "retrain, or give --threshold"
      )
    return fpr_threshold(
      validation_scores, fpr
    ), f"false-positive rate {fpr:g} on {len(validation_scores)} validation normals"
  return float(saved), "saved with the model (validation normals)"


def median(validation_scores: Sequence[float] | None) -> float | None:
  """The validation normals' median score (None when the model holds no scores)."""
  if validation_scores is None or not len(validation_scores):
    return None
  return float(np.median(np.asarray(validation_scores, np.float64)))


def normalized(score: float | np.ndarray, median_score: float | None, threshold: float) -> float | np.ndarray:
  """0.5 * (score - median) / (threshold - median): the median normal maps to 0, the threshold to 0.5.

  Without a median (older models), or with a threshold at or below it, the score is returned as NaN: there is
  no scale to put it on.
  """
  if median_score is None or not threshold > median_score:
    return np.full_like(np.asarray(score, np.float64), np.nan) if np.ndim(score) else float("nan")
  out = 0.5 * (np.asarray(score, np.float64) - median_score) / (threshold - median_score)
  return out if np.ndim(score) else float(out)
