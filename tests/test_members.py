"""Members trained in one program (efficientad_jax/efficientad/members.py) equal their solo runs.

Two members of the tiny synthetic config with different seeds (their own initial networks, batches, dropout
keys and teacher statistics; one shared teacher) take the same steps grouped and alone: the same losses at every
step and the same parameters at the end, within float rounding. Bound, measured on this CPU: relative 1e-4 on
the losses, absolute 2e-5 on any parameter after the steps (the grouped convolutions sum in another order).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficientad_jax import models
from efficientad_jax.config import Config, ModelConfig, TrainConfig
from efficientad_jax.efficientad import members, train_step
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.training import compiler, optim
from tests.conftest import REPO, devices_env

STEPS, N, B, S = 3, 2, 1, 64


@pytest.fixture(scope="module")
def setup():
  cfg = Config(model=ModelConfig(image_size=S, teacher_channels=32), train=TrainConfig(steps=STEPS))
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  teacher = models.init_params(nets, jax.random.key(100), S)["teacher"]
  rng = np.random.default_rng(0)
  c = cfg.model.teacher_channels
  states, stats, batches, keys = [], [], [], []
  for seed in range(N):
    states.append(train_step.init_state(models.init_params(nets, jax.random.key(seed), S), tx))
    stats.append(TeacherStats(rng.normal(0, 0.1, c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)))
    batches.append(
      [
        {k: rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8) for k in ("image", "image_ae", "penalty")}
        for _ in range(STEPS)
      ]
    )
    keys.append(jax.random.key(1000 + seed))
  return cfg, nets, tx, teacher, states, stats, batches, keys


def test_members_equal_their_solo_runs(setup):
  cfg, nets, tx, teacher, states, stats, batches, keys = setup
  solo_step = compiler.jit(lambda st, fr, b, k: train_step.train_step(nets, cfg, tx, st, fr, b, k))
  solo_losses, solo_states = [], []
  for i in range(N):
    state, history = states[i], []
    for b in batches[i]:
      state, losses = solo_step(state, train_step.Frozen(teacher, stats[i]), b, keys[i])
      history.append({k: float(v) for k, v in losses.items()})
    solo_losses.append(history)
    solo_states.append(state)

  group_step = members.compile_members_step(nets, cfg, tx)
  grouped = members.stack(states)
  group_stats = members.stack(stats)
  group_keys = jax.numpy.stack(keys)
  for t in range(STEPS):
    grouped, losses = group_step(
      grouped, teacher, group_stats, members.stack([batches[i][t] for i in range(N)]), group_keys
    )
    for i in range(N):
      for name, value in solo_losses[i][t].items():
        assert float(losses[name][i]) == pytest.approx(value, rel=1e-4, abs=1e-7), (i, t, name)
  for i in range(N):
    ours, alone = members.member(grouped, i), solo_states[i]
    assert int(ours.step) == int(alone.step) == STEPS
    for a, b in zip(jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(alone.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)
  # The members did learn different things (the check above is not trivially true).
  first, second = (jax.tree_util.tree_leaves(members.member(grouped, i).params)[0] for i in range(N))
  assert float(np.abs(np.asarray(first) - np.asarray(second)).max()) > 1e-3


_TWO_DEVICES = r"""
import jax, jax.numpy as jnp, numpy as np
from efficientad_jax import models
from efficientad_jax.config import Config, ModelConfig, TrainConfig
from efficientad_jax.efficientad import members, train_step
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.training import optim, parallel
assert jax.device_count() == 2, jax.devices()
N, B, S = 2, 2, 64
cfg = Config(model=ModelConfig(image_size=S, teacher_channels=32), train=TrainConfig(steps=3))
nets = models.build(cfg.model)
tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
params = [models.init_params(nets, jax.random.key(i), S) for i in range(N)]
host = jax.tree_util.tree_map(np.asarray, (
  members.stack([train_step.init_state(p, tx) for p in params]),
  members.stack([p["teacher"] for p in params]),  # a teacher per member: mapped (teacher_axis 0)
  members.stack([TeacherStats.identity(32)] * N),
))
rng = np.random.default_rng(0)
batches = [{k: rng.integers(0, 256, (N, B, S, S, 3), dtype=np.uint8) for k in ("image", "image_ae")} for _ in range(2)]
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = parallel.data_mesh(devices)
  step = members.compile_group_step(nets, cfg, tx, mesh, 0)
  keys = jnp.stack([jax.random.key(10 + i) for i in range(N)])
  states, teacher, stats, keys, active = jax.device_put((*host, keys, np.ones(N, bool)), parallel.sharding(mesh, "r"))
  for batch in batches:
    sharded = parallel.shard_batch(batch, mesh, "s")  # each member's batch split over the devices
    assert {s.data.shape for s in sharded["image"].addressable_shards} == {(N, B // len(devices), S, S, 3)}
    states, losses = step(states, teacher, stats, sharded, keys, active)
  results.append(jax.tree_util.tree_map(np.asarray, (states.params, losses)))
(p1, out1), (p2, out2) = results
for k in out1:
  np.testing.assert_allclose(out2[k], out1[k], rtol=1e-5, err_msg=k)
lr = cfg.optim.learning_rate  # as tests/test_train_step.py: near-zero gradients move by a fraction of lr
for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
  np.testing.assert_allclose(b, a, rtol=0, atol=0.1 * lr)
print("ok")
"""


def test_group_step_on_two_devices_equals_one_device():
  """`compile_group_step` with each member's batch of 2 split over 2 (simulated) devices: the same losses and
  parameters as on one device (the data-parallel check of tests/test_train_step.py, behind a member axis)."""
  env = dict(os.environ, **devices_env(2))
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_members_that_fit_extrapolates_from_one_and_two():
  # one member 100 bytes, two 160: 60 per member, 40 paid once; 750 of 1000 usable -> (750 - 40) // 60
  assert members.members_that_fit(100, 160, 1000, 0.25) == 11
  assert members.members_that_fit(100, 160, 10, 0.25) == 1  # never 0
  assert members.members_that_fit(100, 100, 1000, 0.0) == 1000 - 99  # no growth measured: 1 byte each
