"""Loss terms under jit against hand-written NumPy references."""

import jax
import numpy as np
import pytest

from efficientad_jax import losses


def _np_hard_loss(t, s, q):
  out = []
  for ti, si in zip(t, s):
    d = ((ti.astype(np.float64) - si) ** 2).ravel()
    out.append(d[d >= np.quantile(d, q)].mean())
  return np.mean(out)


@pytest.mark.parametrize("q", [0.999, 0.9, 0.5])
def test_hard_loss_is_the_mean_over_the_quantile(q):
  rng = np.random.default_rng(0)
  t = rng.normal(size=(3, 7, 5, 16)).astype(np.float32)
  s = rng.normal(size=(3, 7, 5, 16)).astype(np.float32)
  ours = jax.jit(losses.hard_loss, static_argnums=2)(t, s, q)
  np.testing.assert_allclose(float(ours), _np_hard_loss(t, s, q), rtol=1e-5)


def test_hard_loss_with_ties_keeps_every_tied_element():
  t = np.zeros((1, 2, 2, 4), np.float32)
  s = np.ones((1, 2, 2, 4), np.float32)  # all 16 squared errors equal 1
  assert float(losses.hard_loss(t, s, 0.999)) == 1.0


def test_penalty_and_mse():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  b = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  np.testing.assert_allclose(float(jax.jit(losses.penalty_loss)(a)), np.mean(a.astype(np.float64) ** 2), rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(losses.mse)(a, b)), np.mean((a.astype(np.float64) - b) ** 2), rtol=1e-6)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="differ"):
    losses.hard_loss(np.zeros((1, 4, 4, 8)), np.zeros((1, 4, 4, 9)), 0.999)
  with pytest.raises(ValueError, match="differ"):
    losses.mse(np.zeros((1, 4, 4, 8)), np.zeros((1, 4, 4, 9)))
