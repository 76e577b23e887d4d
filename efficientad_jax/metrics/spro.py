"""MVTec LOCO AD saturated per-region overlap (sPRO) curve and its normalised area (AU-sPRO).

Definitions of the official MVTec LOCO AD evaluation v2.0 (Bergmann et al., "Beyond Dents and
Scratches", IJCV 2022, section 4.2; fixtures README section 5.4):

* Each ground-truth PNG of a test image is one defect "channel" c with a mask and a saturation area
  s_c: relative defects s_c = int(threshold * area), absolute ones s_c = min(threshold, area).
* For a threshold t a pixel is positive if score > t (strict):
  sPRO(t) = (1 / C) sum_c min(#{pixels of c with s > t} / s_c, 1) over the C channels of all images,
  FPR(t) = sum_i FP_i(t) / sum_i (FP_i + TN_i) with negatives = pixels outside the union of the
  channels of image i (all pixels of a good image).
* AU-sPRO(L) = (integral_0^L sPRO dFPR) / L, trapezoid rule, sPRO(L) linearly interpolated.

The exact curve through every operating point is built with one global sort, no loop over
thresholds: after sorting a channel's scores in descending order its k-th pixel raises the channel's
sPRO by min(k / s_c, 1) - min((k - 1) / s_c, 1), i.e. 1 / s_c for k <= floor(s_c), the fractional rest
for k = floor(s_c) + 1 and nothing afterwards; so each channel contributes at most ceil(s_c) weighted
"events", merged with one FPR event per negative pixel. Running sums read at the ends of tie groups
give every point the official per-threshold functions give (strict and non-strict thresholds yield the
same set of points). Plenty of exactly equal scores (EfficientAD maps are ~20 % zeros) just form
large tie groups; the official adaptive-threshold scheme fails there, this does not.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from efficientad_jax.metrics import curves

SPRO_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


class DefectChannel(NamedTuple):
  """One ground-truth defect of a LOCO test image."""

  mask: np.ndarray  # (H, W) bool, True on the defect
  saturation_area: float  # pixels of true positives at which this defect counts as fully detected


def saturation_area(defect_area: int, saturation_threshold: float, relative: bool) -> float:
  """Saturation area of a defect (official rule, GroundTruthChannel of LOCO v2.0).

  relative: int(saturation_threshold * defect_area) (truncation, as the official code);
  absolute: min(saturation_threshold, defect_area).
  """
  if relative:
    return float(int(saturation_threshold * defect_area))
  return float(min(saturation_threshold, defect_area))


def channel_from_gt(
  gt: np.ndarray | str | pathlib.Path, defects_config: Sequence[Mapping]
) -> tuple[DefectChannel, dict]:
  """Reads one ground-truth channel and derives its saturation area from defects_config.json.

  Args:
    gt: a (H, W) uint8 array or the path of a GT PNG holding 0 and the defect's `pixel_value`.
    defects_config: the parsed defects_config.json, a list of {"defect_name", "pixel_value",
      "saturation_threshold", "relative_saturation"}.

  Returns:
    (DefectChannel(mask, saturation_area), the matching defects_config entry).
  """
  if isinstance(gt, (str, pathlib.Path)):
    from PIL import (
      Image,  # only needed for paths; keeps the module importable without Pillow
    )

    with Image.open(gt) as image:
      gt = np.asarray(image)
  gt = np.asarray(gt)
  if gt.ndim != 2:
    raise ValueError(f"ground-truth channel must be (H, W), got shape {gt.shape}")
  values = np.unique(gt[gt != 0])
  if values.size != 1:
    raise ValueError(f"ground-truth channel must hold 0 and one defect value, found {values.tolist()}")
  entries = [e for e in defects_config if int(e["pixel_value"]) == int(values[0])]
  if len(entries) != 1:
    raise ValueError(f"pixel value {int(values[0])}: {len(entries)} entries in defects_config")
  entry = entries[0]
  mask = gt == values[0]
  area = int(np.count_nonzero(mask))
  sat = saturation_area(area, float(entry["saturation_threshold"]), bool(entry["relative_saturation"]))
  return DefectChannel(mask, sat), dict(entry)


def _channel_events(scores: np.ndarray, sat: float) -> tuple[np.ndarray, np.ndarray]:
  """The sPRO events of one channel: its top ceil(sat) scores (descending) and their weights (sum 1)."""
  num = min(int(np.ceil(sat)), scores.size)
  # argpartition would avoid the full sort, but channels are small next to the whole split.
  top = np.sort(scores)[::-1][:num]
  cumulative = np.minimum(np.arange(num + 1, dtype=np.float64) / sat, 1.0)
  return top, np.diff(cumulative)


def spro_curve(
  maps: Sequence[np.ndarray] | np.ndarray, channels: Sequence[Sequence[DefectChannel | tuple]]
) -> tuple[np.ndarray, np.ndarray]:
  """Exact sPRO curve of a set of test images (equations in the module docstring).

  Args:
    maps: N (H_i, W_i) anomaly maps (or an (N, H, W) array).
    channels: per image a list of (mask (H_i, W_i) bool, saturation_area > 0); empty for good images.

  Returns:
    (fpr, spro): (P,) float64 arrays from (0, 0) to (1, 1), FPR non-decreasing, one point per
    distinct score that changes the curve.
  """
  maps = curves.as_map_list(maps)
  if len(channels) != len(maps):
    raise ValueError(f"got channel lists for {len(channels)} images but {len(maps)} maps")
  event_scores, fp_weights, spro_weights = [], [], []
  num_channels = 0
  num_negatives = 0
  for i, (amap, image_channels) in enumerate(zip(maps, channels)):
    union = np.zeros(amap.shape, dtype=bool)
    for j, channel in enumerate(image_channels):
      mask, sat = np.asarray(channel[0]) != 0, float(channel[1])
      if mask.shape != amap.shape:
        raise ValueError(f"image {i} channel {j}: mask shape {mask.shape} != map shape {amap.shape}")
      if not mask.any():
        raise ValueError(f"image {i} channel {j}: empty defect mask")
      if not 0.0 < sat <= np.count_nonzero(mask):
        raise ValueError(f"image {i} channel {j}: saturation area {sat} not in (0, defect area]")
      top, weights = _channel_events(amap[mask].astype(np.float64), sat)
      event_scores.append(top)
      fp_weights.append(np.zeros(top.size, dtype=np.int64))
      spro_weights.append(weights)
      union |= mask
      num_channels += 1
    negatives = amap[~union].astype(np.float64)
    event_scores.append(negatives)
    fp_weights.append(np.ones(negatives.size, dtype=np.int64))
    spro_weights.append(np.zeros(negatives.size))
    num_negatives += negatives.size
  if num_channels == 0:
    raise ValueError("sPRO: no defect channel in any image")
  if num_negatives == 0:
    raise ValueError("sPRO: no negative (defect-free) pixel in any image")
  scores = np.concatenate(event_scores)
  order, ends = curves.sort_descending(scores)
  fpr = np.cumsum(np.concatenate(fp_weights)[order])[ends] / num_negatives
  spro = np.minimum(np.cumsum(np.concatenate(spro_weights)[order])[ends] / num_channels, 1.0)
  # (0, 0): threshold at the maximum, nothing is > t. The last group end is everything positive:
  # every channel saturated and every negative a false positive, i.e. (1, 1).
  return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], spro])


def au_spro(
  maps: Sequence[np.ndarray] | np.ndarray,
  channels: Sequence[Sequence[DefectChannel | tuple]],
  limits: Iterable[float] = SPRO_LIMITS,
) -> dict[float, float]:
  """Normalised area under the sPRO curve up to each FPR limit; arguments as in `spro_curve`.

  Returns:
    {limit: AU-sPRO in [0, 1]}, e.g. {0.01: ..., 0.05: ..., 0.1: ..., 0.3: ..., 1.0: ...}.
  """
  limits = curves.check_limits(limits)
  fpr, spro = spro_curve(maps, channels)
  return curves.normalized_areas(fpr, spro, limits)
