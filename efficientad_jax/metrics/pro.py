"""MVTec AD per-region overlap (PRO) curve and its normalised area (AU-PRO).

Definitions of the official MVTec AD evaluation (Bergmann et al., "The MVTec Anomaly Detection
Dataset", IJCV 2021, section 5.2; fixtures README section 4):

* GT regions are the 8-connected components of each ground-truth mask.
* For a threshold t (score >= t is anomalous):
  FPR(t) = #{OK pixels of all images with s >= t} / #{OK pixels of all images},
  PRO(t) = (1 / R) sum_r #{pixels of region r with s >= t} / |r| over the R regions of all images.
* Every distinct score is a threshold; tied scores give one point; (0, 0) and (1, 1) are added.
* AU-PRO(L) = (integral_0^L PRO dFPR) / L, trapezoid rule, PRO(L) linearly interpolated.

The curve is computed exactly with one global sort: each OK pixel carries FPR weight 1 / #OK and
each region pixel carries PRO weight 1 / (R |r|); running sums read at the ends of tie groups are the
curve points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from efficientad_jax.metrics import curves

PRO_LIMITS = (0.05, 0.1, 0.3, 1.0)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """8-connected components of a (H, W) mask (nonzero = defect): ((H, W) int labels 0..n, n)."""
  labeled, num = ndimage.label(np.asarray(mask) != 0, structure=_EIGHT_CONNECTED)
  return labeled, int(num)


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """Per-pixel 1 / |region| for region pixels (0 elsewhere) as (H*W,) float64, and the region count."""
  labeled, num = label_regions(mask)
  sizes = np.bincount(labeled.reshape(-1), minlength=num + 1).astype(np.float64)
  inverse = np.zeros_like(sizes)
  inverse[1:] = 1.0 / sizes[1:]
  return inverse[labeled.reshape(-1)], num


def pro_curve(
  maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Exact PRO curve of a set of images (see the module docstring for the equations).

  The FPRs are rounded to float32 exactly as the official code does (its FP counts are divided in
  float32), so that bounded areas match it to ~1e-16 rather than ~1e-7.

  Args:
    maps: N (H_i, W_i) anomaly maps (or an (N, H, W) array).
    masks: N ground-truth masks of the same shapes, nonzero = defect.

  Returns:
    (fpr, pro): (G + 2,) float64 arrays, FPR non-decreasing, starting (0, 0) and ending (1, 1), G the
    number of distinct scores.
  """
  maps = curves.as_map_list(maps)
  masks = curves.as_mask_list(masks, maps)
  scores = np.concatenate([m.reshape(-1) for m in maps])
  ok = np.concatenate([~m.reshape(-1) for m in masks])
  weights, counts = zip(*(_region_weights(m) for m in masks))
  num_regions = sum(counts)
  num_ok = int(np.count_nonzero(ok))
  if num_regions == 0:
    raise ValueError("PRO: the masks contain no defect region")
  if num_ok == 0:
    raise ValueError("PRO: the masks contain no defect-free (OK) pixel")
  order, ends = curves.sort_descending(scores)
  fp = np.cumsum(ok[order], dtype=np.int64)[ends]
  # float32 count, float64 division, float32 result: the official cast sequence.
  fpr = (fp.astype(np.float32).astype(np.float64) / num_ok).astype(np.float32).astype(np.float64)
  pro = np.cumsum(np.concatenate(weights)[order])[ends] / num_regions
  # Rounding of the running sums may overshoot 1 by an ulp.
  fpr = np.minimum(fpr, 1.0)
  pro = np.minimum(pro, 1.0)
  return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def au_pro(
  maps: Sequence[np.ndarray] | np.ndarray,
  masks: Sequence[np.ndarray] | np.ndarray,
  limits: Iterable[float] = PRO_LIMITS,
) -> dict[float, float]:
  """Normalised area under the PRO curve up to each FPR limit.

  AU-PRO(L) = trapezoid(FPR, PRO, up to L) / L (module docstring). Shapes as in `pro_curve`.

  Returns:
    {limit: AU-PRO in [0, 1]}, keys as floats, e.g. {0.05: ..., 0.1: ..., 0.3: ..., 1.0: ...}.
  """
  limits = curves.check_limits(limits)
  fpr, pro = pro_curve(maps, masks)
  return curves.normalized_areas(fpr, pro, limits)
