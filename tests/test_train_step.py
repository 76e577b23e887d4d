"""Optimizer semantics, the jitted step (compiles once), and data parallelism over 8 simulated devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientad_jax import models
from efficientad_jax.config import Config, ModelConfig, OptimConfig, TrainConfig
from efficientad_jax.efficientad import train_step
from efficientad_jax.training import optim, parallel
from tests.conftest import REPO, devices_env

TINY = Config(model=ModelConfig(image_size=64), train=TrainConfig(steps=10))


def _torch_adam_coupled(p, grads, lr, wd, b1, b2, eps, step_size, gamma):
  """PyTorch Adam(weight_decay) + StepLR, written out by hand in float64."""
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for i, g in enumerate(grads):
    lr_i = lr * gamma ** (i // step_size)
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** (i + 1)), v / (1 - b2 ** (i + 1))
    p = p - lr_i * m_hat / (np.sqrt(v_hat) + eps)
  return p


def test_optimizer_is_adam_with_coupled_l2_and_step_decay():
  cfg = OptimConfig(learning_rate=1e-2, weight_decay=0.1)
  total = 20
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,))
  grads = [rng.normal(size=(5,)) for _ in range(total)]
  tx = optim.make_optimizer(cfg, total)
  p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(jnp.asarray(g), state, p)
    p = p + u
  expected = _torch_adam_coupled(
    p0,
    grads,
    cfg.learning_rate,
    cfg.weight_decay,
    cfg.b1,
    cfg.b2,
    cfg.eps,
    int(cfg.decay_at_fraction * total),
    cfg.decay_factor,
  )
  np.testing.assert_allclose(p, expected, rtol=1e-5)


def _tiny_setup(cfg=TINY, batch_size=2, seed=0):
  nets = models.build(cfg.model)
  params = models.init_params(nets, jax.random.key(seed), cfg.model.image_size)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = train_step.init_state(params, tx)
  c = cfg.model.teacher_channels
  frozen = train_step.Frozen(teacher=params["teacher"], stats=train_step.TeacherStats.identity(c))
  rng = np.random.default_rng(seed)
  h, w = cfg.model.image_size  # config.ImageSize: (H, W)
  batch = {k: rng.normal(size=(batch_size, h, w, 3)).astype(np.float32) for k in ("image", "image_ae", "penalty")}
  return nets, tx, state, frozen, batch


@pytest.fixture(scope="module")
def compiled():
  """One compiled data-parallel step shared by the tests of this module (a compile is most of their cost),
  with host copies of its inputs: the step donates its state, so each test replicates its own."""
  nets, tx, state, frozen, batch = _tiny_setup()
  mesh = parallel.data_mesh()
  step = train_step.compile_train_step(nets, TINY, tx, mesh)
  host = jax.tree_util.tree_map(np.asarray, (state, frozen))
  return step, mesh, host, batch


def test_step_compiles_once_and_updates_only_trainables(compiled):
  step, mesh, host, batch = compiled
  state, frozen = parallel.replicate(host, mesh)
  key = jax.random.key(0)
  losses = []
  for _ in range(3):
    state, out = step(state, frozen, parallel.shard_batch(batch, mesh), key)
    losses.append(float(out["loss"]))
  assert step._cache_size() == 1
  assert int(state.step) == 3
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, host[1].teacher, frozen.teacher)


def test_step_makes_no_hidden_host_device_transfers(compiled):
  """Under transfer_guard('disallow') only the explicit batch upload (shard_batch) may move data."""
  step, mesh, host, batch = compiled
  state, frozen = parallel.replicate(host, mesh)
  key = jax.random.key(0)
  state, _ = step(state, frozen, parallel.shard_batch(batch, mesh), key)  # compiled outside the guard
  with jax.transfer_guard("disallow"):
    for _ in range(2):
      state, losses = step(state, frozen, parallel.shard_batch(batch, mesh), key)
  assert np.isfinite(float(losses["loss"]))
  assert step._cache_size() == 1


def test_k_steps_in_one_call_equal_k_single_steps(compiled):
  """train.steps_per_dispatch: one call of the K-step program equals K one-step calls of it bit for bit on CPU
  (its loop body compiles once, whatever K), and K calls of the straight-line step within float rounding (other
  XLA kernels, other summation orders)."""
  step, mesh, host, batch = compiled
  nets, tx, _, _, _ = _tiny_setup()
  steps = train_step.compile_train_steps(nets, TINY, tx, mesh)
  rng = np.random.default_rng(1)
  batches = [{k: v[:1] + rng.normal(size=v[:1].shape).astype(np.float32) for k, v in batch.items()} for _ in range(2)]
  key = jax.random.key(7)
  stacked = lambda bs: parallel.shard_batch(parallel.stack_batches(bs), mesh, "s")
  results = []
  for calls in ([batches], [[b] for b in batches]):  # one call of K = 2, then two calls of K = 1
    state, frozen = parallel.replicate(host, mesh)
    for group in calls:
      state, losses = steps(state, frozen, stacked(group), key)
    results.append(jax.device_get((state, losses)))
  assert int(results[0][0].step) == 2 and steps._cache_size() == 2  # one program per K
  jax.tree_util.tree_map(np.testing.assert_array_equal, results[0], results[1])
  state, frozen = parallel.replicate(host, mesh)
  for b in batches:
    state, losses = step(state, frozen, parallel.shard_batch(b, mesh), key)
  (k_state, k_losses), lr = results[0], TINY.optim.learning_rate
  for name in losses:
    np.testing.assert_allclose(k_losses[name], float(losses[name]), rtol=1e-5, err_msg=name)
  # Adam turns near-zero gradients into +-lr steps, so rounding may move an element by part of one update.
  for a, b in zip(jax.tree_util.tree_leaves(k_state.params), jax.tree_util.tree_leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * lr)


def test_uint8_images_are_normalised_in_the_step_as_on_the_host():
  """The stream sends uint8; `normalize_images` under jit equals the host's normalize(to_float(x)) up to float32
  rounding (XLA may divide through a reciprocal: observed 7e-7 on values up to 2.6), and float batches pass
  through untouched."""
  from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD
  from efficientad_jax.data import preprocess

  x = np.random.default_rng(0).integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
  floats = np.random.default_rng(1).normal(size=(2, 9, 11, 3)).astype(np.float32)
  out = jax.jit(lambda b: train_step.normalize_images(b, IMAGENET_MEAN, IMAGENET_STD))({"image": x, "f": floats})
  assert out["image"].dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(out["image"]),
    preprocess.normalize(preprocess.to_float(x), IMAGENET_MEAN, IMAGENET_STD),
    rtol=0,
    atol=1e-6,
  )
  np.testing.assert_array_equal(np.asarray(out["f"]), floats)


def test_penalty_is_optional():
  nets, tx, state, frozen, batch = _tiny_setup()
  del batch["penalty"]
  out = jax.jit(lambda p, f, b: train_step.compute_losses(nets, TINY, p, f, b, jax.random.key(0)))(
    state.params, frozen, batch
  )
  assert float(out["loss_penalty"]) == 0.0
  np.testing.assert_allclose(float(out["loss"]), float(out["loss_hard"] + out["loss_ae"] + out["loss_stae"]), rtol=1e-6)


_MULTI_DEVICE = r"""
import jax, numpy as np
from tests.test_train_step import TINY, _tiny_setup
from efficientad_jax.efficientad import train_step
from efficientad_jax.training import parallel
assert jax.device_count() == 8, jax.devices()
results = []
for devices in (jax.devices()[:1], jax.devices()):
  nets, tx, state, frozen, batch = _tiny_setup(batch_size=8)
  mesh = parallel.data_mesh(devices)
  step = train_step.compile_train_step(nets, TINY, tx, mesh)
  state, frozen = parallel.replicate((state, frozen), mesh)
  for i in range(2):
    state, out = step(state, frozen, parallel.shard_batch(batch, mesh), jax.random.key(0))
  stacked = parallel.shard_batch(parallel.stack_batches([batch] * 3), mesh, "s")  # K steps per call: batch axis 1
  assert {s.data.shape for s in stacked["image"].addressable_shards} == {(3, 8 // len(devices), 64, 64, 3)}
  results.append(jax.tree_util.tree_map(np.asarray, (state.params, out)))
(p1, out1), (p8, out8) = results
for k in out1:
  np.testing.assert_allclose(out8[k], out1[k], rtol=1e-5, err_msg=k)
# Adam divides by sqrt(v): float rounding of near-zero gradients (summed in another order across devices)
# moves an element by a fraction of one update, so parameters are compared in units of lr.
lr = TINY.optim.learning_rate
for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
  np.testing.assert_allclose(b, a, rtol=0, atol=0.1 * lr)
print("ok")
"""


def test_eight_devices_equal_one_device_on_the_same_global_batch():
  env = dict(os.environ, **devices_env(8))
  proc = subprocess.run(
    [sys.executable, "-c", _MULTI_DEVICE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


class _Device:
  """Stands in for a jax.Device: only `process_index` is read."""

  def __init__(self, process_index: int, i: int):
    self.process_index, self.id = process_index, i


def test_data_parallel_devices_divide_the_global_batch():
  one_host = [_Device(0, i) for i in range(8)]
  for batch, used in ((1, 1), (2, 2), (3, 3), (5, 5), (6, 6), (7, 7), (8, 8), (12, 6), (16, 8), (9, 3), (11, 1)):
    chosen = parallel.data_parallel_devices(batch, one_host)
    assert chosen == one_host[:used], batch
  # Two processes with 4 devices each: equal shares, the same number of devices from each.
  two_hosts = [_Device(p, 4 * p + i) for p in (1, 0) for i in range(4)]  # listing order is irrelevant
  for batch, per_host in ((2, 1), (4, 2), (6, 3), (8, 4), (10, 1), (16, 4)):
    chosen = parallel.data_parallel_devices(batch, two_hosts)
    assert [d.process_index for d in chosen] == [0] * per_host + [1] * per_host, batch
  with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
    parallel.data_parallel_devices(3, two_hosts)
  for bad in (0, -4):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
      parallel.data_parallel_devices(bad, one_host)
