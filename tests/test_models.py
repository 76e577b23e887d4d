"""Networks: parity with nelson1425's PyTorch networks (fixtures/networks), sizes and parameter counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientad_jax import models
from efficientad_jax.config import ModelConfig
from tests import reference


def _cases(fixtures):
  return json.loads((fixtures / "networks" / "network_outputs.json").read_text())["cases"]


def _module(case: str, info: dict, params) -> models.PDN | models.Autoencoder:
  if case.startswith("autoencoder"):
    return models.Autoencoder(out_size=tuple(info["shape"][2:]), out_channels=info["shape"][1])
  size = "small" if "small" in case else "medium"
  return models.PDN(size, info["shape"][1], padded="padded" in case)


def test_every_fixture_case_matches_reference(fixtures):
  """All cases of network_outputs.json within the README's float32 tolerances."""
  cases = _cases(fixtures)
  ref = np.load(fixtures / "networks" / "network_outputs.npz")
  assert cases, "no network cases in the fixtures"
  for case, info in cases.items():
    params = reference.network_params(fixtures, info["weights"].split()[0])
    module = _module(case, info, params)
    seed, j = info["input"]["seed"], info["input"]["j"]
    _, _, h, w = info["input"]["shape"]
    x = reference.recipe_input(seed, j, h, w)
    y = reference.to_nchw(jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x))
    assert list(y.shape) == info["shape"], case
    std = info["std"]
    np.testing.assert_allclose(
      y.reshape(-1)[ref[f"{case}__idx"]], ref[f"{case}__val"], rtol=0, atol=1e-4 * std, err_msg=case
    )
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(y64.mean(axis=(0, 2, 3)), ref[f"{case}__mean_c"], rtol=0, atol=1e-5 * std, err_msg=case)
    np.testing.assert_allclose(y64.std(axis=(0, 2, 3)), ref[f"{case}__std_c"], rtol=1e-4, err_msg=case)
    assert abs(y64.sum() - info["sum_float64"]) <= 1e-6 * y.size * std, case


@pytest.mark.parametrize("size,teacher,student", [("small", 2_694_144, 4_267_392), ("medium", 8_026_624, 11_615_488)])
def test_parameter_counts(size, teacher, student):
  nets = models.build(ModelConfig(size=size))
  shapes = jax.eval_shape(lambda k: models.init_params(nets, k, 256), jax.random.key(0))
  assert models.count_params(shapes["teacher"]) == teacher
  assert models.count_params(shapes["student"]) == student
  assert models.count_params(shapes["autoencoder"]) == 1_096_320


def test_output_sizes():
  assert models.pdn_output_size((256, 256)) == (56, 56)
  assert models.pdn_output_size((256,), padded=True) == (64,)
  assert models.pdn_output_size((160, 224)) == (32, 48)
  assert models.decoder_sizes(256) == (3, 8, 15, 32, 63, 127)


def test_autoencoder_dropout_is_explicit_and_seeded():
  nets = models.build(ModelConfig(image_size=64))
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  p = nets.autoencoder.init(jax.random.key(0), x)["params"]
  apply = jax.jit(lambda p, x, k: nets.autoencoder.apply({"params": p}, x, deterministic=False, rngs={"dropout": k}))
  a, b = apply(p, x, jax.random.key(2)), apply(p, x, jax.random.key(2))
  c = apply(p, x, jax.random.key(3))
  e = nets.autoencoder.apply({"params": p}, x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert not np.allclose(a, e)


def test_bfloat16_compute_keeps_float32_params():
  nets = models.build(ModelConfig(image_size=64, dtype="bfloat16"))
  params = models.init_params(nets, jax.random.key(0), 64)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  y = nets.student.apply({"params": params["student"]}, jnp.ones((1, 64, 64, 3)))
  assert y.dtype == jnp.bfloat16


def test_bad_sizes_are_rejected():
  with pytest.raises(ValueError, match="PDN size"):
    models.PDN("large").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="multiple of 32"):
    models.Autoencoder(out_size=(8, 8)).init(jax.random.key(0), jnp.zeros((1, 80, 80, 3)))
  with pytest.raises(ValueError, match="too small"):
    models.build(ModelConfig(image_size=16))


def test_initial_tensors_are_independent_draws():
  """PyTorch draws every tensor from the global generator in turn; ours draws each from its own key. Equal
  per-tensor distributions would not show two tensors drawn from one key (a layer name used twice, a kernel and
  its bias sharing a key): over every pair of student and autoencoder tensors the correlation of their first
  values stays at what independent draws give (z = |r| sqrt(n) < 5; the largest of ~560 independent pairs is ~3)."""
  nets = models.build(ModelConfig())
  params = models.init_params(nets, jax.random.key(0), 64)
  leaves = jax.tree_util.tree_flatten_with_path({k: params[k] for k in ("student", "autoencoder")})[0]
  flat = {jax.tree_util.keystr(path): np.asarray(v, np.float64).ravel() for path, v in leaves}
  z = {}
  names = sorted(flat)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      n = min(flat[a].size, flat[b].size, 100_000)
      if n >= 50:
        z[a, b] = abs(np.corrcoef(flat[a][:n], flat[b][:n])[0, 1]) * np.sqrt(n)
  assert len(z) > 500
  worst = max(z, key=z.get)
  assert z[worst] < 5.0, (worst, z[worst])
