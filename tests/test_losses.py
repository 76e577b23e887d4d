"""Loss terms under jit against hand-written NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientad_jax.efficientad import losses


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
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    losses.row_quantile(np.zeros((1, 8), np.float32), 1.5)
  with pytest.raises(ValueError, match="differ"):
    losses.mse(np.zeros((1, 4, 4, 8)), np.zeros((1, 4, 4, 9)))


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("n,ties", [(1, False), (7, False), (560, False), (560, True), (100_003, False)])
def test_row_quantile_equals_jnp_quantile_bit_for_bit(q, n, ties):
  rng = np.random.default_rng(n)
  rows = rng.normal(size=(3, n)).astype(np.float32)  # negatives, positives and (rounded) ties
  if ties:
    rows = np.round(rows, 1)
  rows[1] = np.square(rows[1])  # squared errors, the case hard_loss feeds it
  ours = np.asarray(jax.jit(losses.row_quantile, static_argnums=1)(rows, q))
  ref = np.asarray(jax.vmap(lambda r: jnp.quantile(r, q))(rows))
  np.testing.assert_array_equal(ours, ref)
  # Independent of jnp: between NumPy's two neighbouring order statistics, and near its float64 linear value
  # (jnp, and so we, place q*(N-1) in float32).
  assert np.all(np.quantile(rows, q, axis=1, method="lower") <= ours)
  assert np.all(ours <= np.quantile(rows, q, axis=1, method="higher"))
  np.testing.assert_allclose(ours, np.quantile(rows.astype(np.float64), q, axis=1), rtol=2e-5, atol=1e-6)


def test_row_quantile_of_extreme_values():
  rows = np.array([[np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 2.0, 1e-30]], np.float32)
  for q in (0.0, 0.3, 0.5, 0.999, 1.0):
    ref = jax.vmap(lambda r, q=q: jnp.quantile(r, q))(rows)
    np.testing.assert_array_equal(np.asarray(losses.row_quantile(rows, q)), np.asarray(ref))
