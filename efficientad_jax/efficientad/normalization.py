"""Teacher channel statistics and anomaly-map quantile normalisation (paper §3.2, §3.4; docs/method.md §5.1, §7.2).

Fitting runs on the host over a few hundred images (not a hot path); applying is pure jnp used by the one
inference path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TeacherStats:
  """Per-channel normalisation of the teacher output: T_hat = (T - mean) / std. Shapes [C], float32."""

  mean: jnp.ndarray
  std: jnp.ndarray

  @classmethod
  def identity(cls, channels: int) -> TeacherStats:
    """mean 0, std 1: leaves features unchanged (tests and benchmarks of the step alone)."""
    return cls(mean=jnp.zeros(channels, jnp.float32), std=jnp.ones(channels, jnp.float32))


@flax.struct.dataclass
class MapQuantiles:
  """q_a (start) and q_b (end) quantiles of validation map values, for the local (st) and global (ae) maps."""

  st_start: jnp.ndarray
  st_end: jnp.ndarray
  ae_start: jnp.ndarray
  ae_end: jnp.ndarray


def normalize_teacher(features: jnp.ndarray, stats: TeacherStats) -> jnp.ndarray:
  """[B, H, W, C] teacher features -> channel-normalised float32 features."""
  return (features.astype(jnp.float32) - stats.mean) / stats.std


def fit_teacher_stats(
  features_fn: Callable[[np.ndarray], np.ndarray], batches: Callable[[], Iterable[np.ndarray]]
) -> TeacherStats:
  """Exact two-pass teacher statistics over the training images (paper section 3.2).

  mean_c = mean over images of the spatial mean of T; var_c = mean over images of the spatial mean of
  (T - mean_c)^2; std_c = sqrt(var_c). Accumulated in float64 on the host.

  Args:
    features_fn: images [B, S, S, 3] -> teacher features [B, h, w, C] (a jitted teacher forward).
    batches: a callable returning a fresh iterable of image batches (called twice, once per pass).
  """
  total, count = 0.0, 0
  for images in batches():
    t = np.asarray(features_fn(images), np.float64)
    total = total + t.mean(axis=(1, 2)).sum(axis=0)
    count += t.shape[0]
  if count == 0:
    raise ValueError("fit_teacher_stats: no training images")
  mean = total / count
  sq = 0.0
  for images in batches():
    t = np.asarray(features_fn(images), np.float64)
    sq = sq + np.square(t - mean).mean(axis=(1, 2)).sum(axis=0)
  std = np.sqrt(sq / count)
  return TeacherStats(mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32))


def fit_map_quantiles(maps_st: np.ndarray, maps_ae: np.ndarray, q_start: float, q_end: float) -> MapQuantiles:
  """Quantiles (linear interpolation) of all pixels of all validation maps, per map type.

  Args:
    maps_st, maps_ae: raw local / global maps of the validation normals, any shape (e.g. [N, 56, 56]).
  """
  maps_st, maps_ae = np.asarray(maps_st), np.asarray(maps_ae)
  if maps_st.size == 0 or maps_ae.size == 0:
    raise ValueError("fit_map_quantiles: no validation maps")
  qs = np.quantile(maps_st.astype(np.float64), [q_start, q_end])
  qa = np.quantile(maps_ae.astype(np.float64), [q_start, q_end])
  for name, (lo, hi) in (("local", qs), ("global", qa)):
    if not hi > lo:
      raise ValueError(
        f"fit_map_quantiles: degenerate {name} map quantiles ({lo}, {hi}); are the validation images all identical?"
      )
  f = lambda v: jnp.asarray(v, jnp.float32)
  return MapQuantiles(st_start=f(qs[0]), st_end=f(qs[1]), ae_start=f(qa[0]), ae_end=f(qa[1]))


def normalize_map(m: jnp.ndarray, start: jnp.ndarray, end: jnp.ndarray, scale: float) -> jnp.ndarray:
  """m' = scale * (m - q_a) / (q_b - q_a): 0 at the q_a quantile, `scale` at the q_b quantile of normals."""
  return scale * (m - start) / (end - start)
