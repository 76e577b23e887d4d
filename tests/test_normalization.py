"""Teacher statistics and map quantiles against NumPy definitions."""

import jax
import numpy as np
import pytest

from efficientad_jax.efficientad import normalization


def test_teacher_stats_two_pass_definition():
  rng = np.random.default_rng(0)
  feats = [rng.normal(1.0, 2.0, size=(2, 5, 6, 8)).astype(np.float32) for _ in range(3)]
  stats = normalization.fit_teacher_stats(lambda x: x, lambda: iter(feats))
  allf = np.concatenate(feats).astype(np.float64)
  mean = allf.mean(axis=(1, 2)).mean(axis=0)
  var = ((allf - mean) ** 2).mean(axis=(1, 2)).mean(axis=0)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(stats.std, np.sqrt(var), rtol=1e-6)
  t = jax.jit(normalization.normalize_teacher)(allf.astype(np.float32), stats)
  np.testing.assert_allclose(t.mean(axis=(0, 1, 2)), 0, atol=1e-5)


def test_map_quantiles_and_normalisation():
  rng = np.random.default_rng(1)
  st, ae = rng.gamma(2.0, size=(4, 9, 9)), rng.gamma(3.0, size=(4, 9, 9))
  q = normalization.fit_map_quantiles(st, ae, 0.9, 0.995)
  np.testing.assert_allclose([q.st_start, q.st_end], np.quantile(st, [0.9, 0.995]), rtol=1e-6)
  np.testing.assert_allclose([q.ae_start, q.ae_end], np.quantile(ae, [0.9, 0.995]), rtol=1e-6)
  m = jax.jit(normalization.normalize_map, static_argnums=3)(st, q.st_start, q.st_end, 0.1)
  np.testing.assert_allclose(np.quantile(m, [0.9, 0.995]), [0.0, 0.1], atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="no training images"):
    normalization.fit_teacher_stats(lambda x: x, lambda: iter([]))
  with pytest.raises(ValueError, match="no validation maps"):
    normalization.fit_map_quantiles(np.zeros((0,)), np.zeros((3,)), 0.9, 0.995)
  with pytest.raises(ValueError, match="degenerate"):
    normalization.fit_map_quantiles(np.ones((2, 4, 4)), np.arange(32.0), 0.9, 0.995)
