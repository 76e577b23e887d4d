"""Calibration on validation normals, shared by every method (paper §3.4; docs/method.md §7.2, §7.4).

Test images are never used. EfficientAD fits its map quantiles on the validation images' raw local and global
maps (`calibrate_efficientad`); every method's decision threshold is the `threshold_quantile` of the validation
images' scores under the finished model (`threshold`). Both run the method's one jitted predict function in
fixed-size batches grouped by original size (`data.pipeline.size_batches`), as evaluation does, so calibration and
evaluation compile the same programs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from efficientad_jax import inference
from efficientad_jax.config import Config
from efficientad_jax.data.pipeline import ordered_batches
from efficientad_jax.inference import Detector
from efficientad_jax.normalization import TeacherStats, fit_map_quantiles

Predict = Callable[..., dict]  # fn(detector, images [B, S, S, 3], out_size=(H, W)) -> {'score', 'map_st', ...}


def outputs(predict_fn: Predict, detector: Any, records: Any, keys: Iterable[str], batch_size: int
            ) -> dict[str, np.ndarray]:
  """{key: [N, ...] host array} of `predict_fn`'s outputs for the N eval records (padding images dropped)."""
  keys = tuple(keys)
  collected: dict[int, dict[str, np.ndarray]] = {}
  for size, indices, images in ordered_batches(records, batch_size):
    out = predict_fn(detector, images, out_size=size)
    host = {k: np.asarray(out[k]) for k in keys}
    for j, i in enumerate(indices):
      collected[i] = {k: host[k][j] for k in keys}
  if not collected:
    raise ValueError("calibration needs at least one validation image")
  return {k: np.stack([collected[i][k] for i in sorted(collected)]) for k in keys}


def threshold(predict_fn: Predict, detector: Any, records: Any, quantile: float, batch_size: int) -> float:
  """The `quantile` of the records' image scores: above it an image is called anomalous."""
  scores = outputs(predict_fn, detector, records, ("score",), batch_size)["score"]
  return float(np.quantile(scores.astype(np.float64), quantile))


def calibrate_efficientad(cfg: Config, params: dict, stats: TeacherStats, records: Any, batch_size: int
                          ) -> tuple[Detector, float]:
  """(the complete EfficientAD detector, decision threshold) from validation normals: the map quantiles are
  fitted on the raw local and global maps, then the threshold on the scores of the calibrated detector.
  The predict function is the one `saved_model.load` uses for `cfg` (`inference.compiled_predict`)."""
  nets, predict_fn = inference.compiled_predict(cfg.model, cfg.maps)
  raw = inference.make_raw_maps_fn(nets)
  raw_maps = lambda _, images, out_size: dict(zip(("map_st", "map_ae"), raw(params, stats, images)))  # noqa: E731
  maps = outputs(raw_maps, None, records, ("map_st", "map_ae"), batch_size)
  quantiles = fit_map_quantiles(maps["map_st"], maps["map_ae"], cfg.maps.q_start, cfg.maps.q_end)
  detector = Detector(params=params, teacher_stats=stats, quantiles=quantiles)
  return detector, threshold(predict_fn, detector, records, cfg.maps.threshold_quantile, batch_size)
