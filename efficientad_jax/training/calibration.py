"""Calibration on validation normals, shared by every method (paper §3.4; docs/method.md §7.2, §7.4).

Test images are never used. EfficientAD fits its map quantiles on the validation images' raw local and global
maps (`efficientad.inference.calibrate`); every method's decision threshold is the `threshold_quantile` of the
validation
images' scores under the finished model (`threshold`). Both run the method's one jitted predict function in
fixed-size batches grouped by original size (`data.batches.size_batches`), as evaluation does, so calibration and
evaluation compile the same programs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from efficientad_jax.data.batches import map_batches, ordered_batches

Predict = Callable[..., dict]  # fn(detector, images [B, S, S, 3], out_size=(H, W)) -> {'score', 'map_st', ...}


def outputs(
  predict_fn: Predict, detector: Any, records: Any, keys: Iterable[str], batch_size: int
) -> dict[str, np.ndarray]:
  """{key: [N, ...] host array} of `predict_fn`'s outputs for the N eval records (padding images dropped)."""
  keys = tuple(keys)
  collected: dict[int, dict[str, np.ndarray]] = {}

  def run(images, size):
    out = predict_fn(detector, images, out_size=size)
    return {k: out[k] for k in keys}

  for indices, host in map_batches(run, ordered_batches(records, batch_size)):
    for j, i in enumerate(indices):
      collected[i] = {k: host[k][j] for k in keys}
  if not collected:
    raise ValueError("calibration needs at least one validation image")
  return {k: np.stack([collected[i][k] for i in sorted(collected)]) for k in keys}


def threshold(
  predict_fn: Predict, detector: Any, records: Any, quantile: float, batch_size: int
) -> tuple[float, list[float]]:
  """(the `quantile` of the records' image scores, those scores sorted): above the threshold an image is called
  anomalous; the scores go into the saved model so that a user can choose another threshold later
  (`serving.thresholds`)."""
  scores = outputs(predict_fn, detector, records, ("score",), batch_size)["score"].astype(np.float64)
  return float(np.quantile(scores, quantile)), sorted(float(v) for v in scores)
