"""Shared pieces of the threshold-sweep metrics: input checks, tie groups, bounded trapezoid.

Every curve in this package is built the same way: sort all scores once in descending order, take
running sums of per-element weights, and read them only at the last element of each group of equal
scores. Reading at group ends merges tied scores into one curve point, which is how the official
MVTec AD / MVTec LOCO evaluations treat ties, and makes one curve point per distinct score.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def as_map_list(maps: Sequence[np.ndarray] | np.ndarray, name: str = "maps") -> list[np.ndarray]:
  """Returns the anomaly maps as a list of 2-D float arrays, checked to be non-empty and finite.

  Args:
    maps: an (N, H, W) array or a sequence of N (H_i, W_i) arrays.
    name: how the argument is called in error messages.
  """
  if isinstance(maps, np.ndarray):
    if maps.ndim != 3:
      raise ValueError(f"{name}: expected an (N, H, W) array, got shape {maps.shape}")
    maps = list(maps)
  out = [np.asarray(m) for m in maps]
  if not out:
    raise ValueError(f"{name}: no maps given")
  for i, m in enumerate(out):
    if m.ndim != 2 or m.size == 0:
      raise ValueError(f"{name}[{i}]: expected a non-empty (H, W) map, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating):
      raise ValueError(f"{name}[{i}]: expected real numbers, got dtype {m.dtype}")
    if not np.all(np.isfinite(m)):
      # NaN breaks sorting-based tie grouping silently; refuse it loudly.
      raise ValueError(f"{name}[{i}]: contains NaN or infinite values")
  return out


def as_mask_list(
  masks: Sequence[np.ndarray] | np.ndarray, maps: Sequence[np.ndarray], name: str = "masks"
) -> list[np.ndarray]:
  """Returns ground-truth masks as boolean (H_i, W_i) arrays (nonzero = anomalous), one per map."""
  if isinstance(masks, np.ndarray) and masks.ndim == 3:
    masks = list(masks)
  out = [np.asarray(m) != 0 for m in masks]
  if len(out) != len(maps):
    raise ValueError(f"{name}: got {len(out)} masks for {len(maps)} maps")
  for i, (mask, amap) in enumerate(zip(out, maps)):
    if mask.shape != amap.shape:
      raise ValueError(f"{name}[{i}]: mask shape {mask.shape} != map shape {amap.shape}")
  return out


def check_limits(limits: Iterable[float]) -> tuple[float, ...]:
  """Integration limits as floats in (0, 1]; at least one."""
  out = tuple(float(limit) for limit in limits)
  if not out:
    raise ValueError("no integration limits given")
  for limit in out:
    if not 0.0 < limit <= 1.0:
      raise ValueError(f"integration limit {limit} is not in (0, 1]")
  return out


def sort_descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorts 1-D scores in descending order.

  Returns:
    (order, ends): `order` (N,) int indices with scores[order] descending; `ends` (G,) indices into the
    sorted array of the last element of each of the G groups of equal scores, ascending.
  """
  # The order inside a tie group is irrelevant: sums are only read at the group ends.
  order = np.argsort(scores)[::-1]
  ranked = scores[order]
  ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
  return order, ends


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
  """Area under the polyline through (x_i, y_i), optionally only from x_0 up to `x_max`.

  A = sum_i (x_{i+1} - x_i) (y_i + y_{i+1}) / 2 over the points with x <= x_max, plus, when x_max is
  not a node, the piece from the last node below x_max to x_max, with y(x_max) linearly interpolated
  between that node and the next one. With repeated x (vertical steps) the last of the repeated nodes
  is used, i.e. the top of the step. This is the bounded trapezoid of the MVTec AD / LOCO evaluations
  (Bergmann et al., IJCV 2021 and 2022).

  Args:
    x: (P,) non-decreasing abscissae.
    y: (P,) ordinates.
    x_max: upper integration bound within [x_0, x_{P-1}], or None for the whole curve.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size < 2:
    raise ValueError(f"trapezoid: need two 1-D arrays of equal length >= 2, got {x.shape}, {y.shape}")
  if np.any(np.diff(x) < 0):
    raise ValueError("trapezoid: x must be non-decreasing")
  correction = 0.0
  if x_max is not None:
    if not x[0] <= x_max <= x[-1]:
      raise ValueError(f"trapezoid: x_max={x_max} outside [{x[0]}, {x[-1]}]")
    if not np.any(x == x_max):
      ins = int(np.searchsorted(x, x_max, side="right"))  # x[ins - 1] < x_max < x[ins]
      y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
      correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def normalized_areas(x: np.ndarray, y: np.ndarray, limits: Iterable[float]) -> dict[float, float]:
  """{limit: trapezoid(x, y, limit) / limit} for each integration limit (a value in [0, 1])."""
  return {limit: trapezoid(x, y, limit) / limit for limit in check_limits(limits)}
