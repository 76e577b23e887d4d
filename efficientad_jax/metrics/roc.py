"""ROC and F1 metrics over scores with binary labels, at image and at pixel level.

All curves are exact: every distinct score is a threshold (score >= t is predicted anomalous) and tied
scores form one curve point, so the AU-ROC equals the Mann-Whitney statistic with ties counted 1/2
(Hanley & McNeil, Radiology 1982) and `sklearn.metrics.roc_auc_score`. One sort plus running sums:
O(N log N), no loop over thresholds, fast enough for 1e8 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from efficientad_jax.metrics import curves


def _scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flattens and checks scores and labels: same size, finite, both classes present."""
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  if scores.shape != labels.shape:
    raise ValueError(f"scores shape {scores.shape} != labels shape {labels.shape}")
  if scores.size == 0:
    raise ValueError("no scores given")
  if not np.issubdtype(scores.dtype, np.number) or not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite real numbers")
  scores = scores.reshape(-1)
  labels = labels.reshape(-1) != 0
  num_pos = int(np.count_nonzero(labels))
  if num_pos == 0:
    raise ValueError("no positive (anomalous) labels: the metric is undefined")
  if num_pos == labels.size:
    raise ValueError("no negative (normal) labels: the metric is undefined")
  return scores, labels


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cumulative (TP, FP) counts at each distinct threshold, thresholds descending.

  Returns:
    (thresholds, tp, fp), each (G,): with t = thresholds[g], tp[g] = #{positives with score >= t},
    fp[g] = #{negatives with score >= t}.
  """
  order, ends = curves.sort_descending(scores)
  tp = np.cumsum(labels[order], dtype=np.int64)[ends]
  fp = (ends + 1) - tp
  return scores[order][ends], tp, fp


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact ROC curve with tied scores merged.

  FPR(t) = #{neg: s >= t} / #neg, TPR(t) = #{pos: s >= t} / #pos for each distinct score t.

  Args:
    scores: (N,) or any shape, anomaly scores (higher = more anomalous).
    labels: same shape, nonzero = positive (anomalous).

  Returns:
    (fpr, tpr, thresholds): (G + 1,) arrays, thresholds descending; the first point is (0, 0) with
    threshold +inf, the last is (1, 1).
  """
  scores, labels = _scores_labels(scores, labels)
  thresholds, tp, fp = _counts(scores, labels)
  fpr = np.concatenate([[0.0], fp / fp[-1]])
  tpr = np.concatenate([[0.0], tp / tp[-1]])
  return fpr, tpr, np.concatenate([[np.inf], thresholds.astype(np.float64)])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the exact ROC curve, trapezoid rule (ties contribute half, as in Mann-Whitney U).

  Args:
    scores: (N,) or any shape, anomaly scores.
    labels: same shape, nonzero = positive.
  """
  fpr, tpr, _ = roc_curve(scores, labels)
  return curves.trapezoid(fpr, tpr)


def _auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
  return curves.trapezoid(np.concatenate([[0.0], fp / fp[-1]]), np.concatenate([[0.0], tp / tp[-1]]))


def _f1_from_counts(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> dict[str, float]:
  num_pos = tp[-1]
  f1 = 2.0 * tp / (tp + fp + num_pos)  # denominators >= num_pos > 0
  best = int(np.argmax(f1))  # first maximum = highest threshold
  return {
    "f1": float(f1[best]),
    "precision": float(tp[best] / (tp[best] + fp[best])),
    "recall": float(tp[best] / num_pos),
    "threshold": float(thresholds[best]),
  }


def auroc_and_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, float]]:
  """(`auroc`, `f1_optimal`) of the same scores from a single sort (for large pixel sets)."""
  scores, labels = _scores_labels(scores, labels)
  thresholds, tp, fp = _counts(scores, labels)
  return _auroc_from_counts(tp, fp), _f1_from_counts(thresholds, tp, fp)


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Precision, recall and F1 at the threshold that maximises F1.

  For each distinct score t (score >= t predicted positive): P = TP / (TP + FP), R = TP / #pos,
  F1 = 2 P R / (P + R) = 2 TP / (TP + FP + #pos). Ties in F1 go to the highest threshold.
  (F1-adaptive threshold as in anomalib; van Rijsbergen, Information Retrieval, 1979.)

  Args:
    scores: (N,) or any shape, anomaly scores.
    labels: same shape, nonzero = positive.

  Returns:
    {"f1", "precision", "recall", "threshold"}.
  """
  scores, labels = _scores_labels(scores, labels)
  return _f1_from_counts(*_counts(scores, labels))


def image_scores(maps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """Image anomaly score = maximum of the full-resolution map (paper §4; docs/method.md §9). (N,) float64."""
  return np.array([float(np.max(m)) for m in curves.as_map_list(maps)], dtype=np.float64)


def _image_labels(labels: Sequence[int] | np.ndarray, num: int) -> np.ndarray:
  labels = np.asarray(labels).reshape(-1)
  if labels.size != num:
    raise ValueError(f"got {labels.size} image labels for {num} maps")
  return labels != 0


def image_auroc(maps: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """Image-level AU-ROC of the map maxima. maps: N (H, W) maps; labels: (N,), nonzero = anomalous."""
  scores = image_scores(maps)
  return auroc(scores, _image_labels(labels, scores.size))


def image_f1(maps: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, float]:
  """`f1_optimal` of the map maxima. maps: N (H, W) maps; labels: (N,), nonzero = anomalous."""
  scores = image_scores(maps)
  return f1_optimal(scores, _image_labels(labels, scores.size))


def _pixels(maps, masks) -> tuple[np.ndarray, np.ndarray]:
  """All pixels of all maps and masks, flattened: ((P,) scores, (P,) bool labels)."""
  maps = curves.as_map_list(maps)
  masks = curves.as_mask_list(masks, maps)
  return (np.concatenate([m.reshape(-1) for m in maps]), np.concatenate([m.reshape(-1) for m in masks]))


def pixel_auroc(maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray) -> float:
  """Pixel-level AU-ROC over all pixels of all images.

  Args:
    maps: N (H_i, W_i) anomaly maps (or an (N, H, W) array).
    masks: N ground-truth masks of the same shapes, nonzero = anomalous pixel.
  """
  return auroc(*_pixels(maps, masks))


def pixel_f1(maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray) -> dict[str, float]:
  """`f1_optimal` over all pixels of all images; shapes as in `pixel_auroc`."""
  return f1_optimal(*_pixels(maps, masks))


def pixel_auroc_and_f1(
  maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray
) -> tuple[float, dict[str, float]]:
  """(`pixel_auroc`, `pixel_f1`) from one sort of all pixels; shapes as in `pixel_auroc`."""
  return auroc_and_f1(*_pixels(maps, masks))
