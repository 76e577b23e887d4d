"""EfficientAD-AST networks: flow invertibility and log-det (brute-force Jacobian), positional encoding and
adaptive pooling against NumPy by hand, shapes of every network, EfficientNet trunk parity with a PyTorch
reference in torchvision's layout (built here from torch.nn primitives, random weights, read back through
the torch-free .pth reader)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from efficientad_jax.efficientad_ast import inference as method
from efficientad_jax.efficientad_ast.config import AstConfig
from efficientad_jax.files.pth import load_state_dict
from efficientad_jax.models import efficientnet
from efficientad_jax.models.feature_autoencoder import (
  FeatureAutoencoder,
  adaptive_avg_pool,
  decoder_steps,
  encoder_sizes,
)
from efficientad_jax.models.flow import (
  ConditionalFlow,
  nll_loss,
  positional_encoding,
  soft_clamp,
)
from efficientad_jax.models.residual_student import ResidualStudent


def _tiny_flow(c=5, p=4):
  flow = ConditionalFlow(c, p, blocks=3, hidden=8, kernel=3, clamp=2.0, seed=1)
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, c))
  cond = jax.random.normal(jax.random.key(1), (2, 3, 3, p))
  params = flow.init(jax.random.key(2), x, cond)["params"]
  # Scale the default-initialised weights up so that the couplings are far from the identity.
  params = jax.tree_util.tree_map(lambda w: 2.0 * w, params)
  return flow, params, x, cond


def test_flow_inverse_of_forward():
  flow, params, x, cond = _tiny_flow()
  z, logdet = jax.jit(lambda p, x, c: flow.apply({"params": p}, x, c))(params, x, cond)
  assert z.shape == x.shape and logdet.shape == x.shape[:3]
  assert float(jnp.max(jnp.abs(z - x))) > 0.1  # not the identity
  back = jax.jit(lambda p, z, c: flow.apply({"params": p}, z, c, method=ConditionalFlow.inverse))(params, z, cond)
  np.testing.assert_allclose(back, x, atol=1e-5)


def test_flow_logdet_matches_jacobian():
  flow, params, x, cond = _tiny_flow()
  x1, c1 = x[:1], cond[:1]
  f = lambda v: flow.apply({"params": params}, v.reshape(x1.shape), c1)[0].reshape(-1)
  jac = jax.jacfwd(f)(x1.reshape(-1))
  sign, ref = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign != 0
  _, logdet = flow.apply({"params": params}, x1, c1)
  np.testing.assert_allclose(float(jnp.sum(logdet)), ref, rtol=1e-4, atol=1e-4)


def test_nll_loss_by_hand():
  z = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
  ld = np.random.default_rng(1).normal(size=(2, 3, 3)).astype(np.float32)
  w = (np.random.default_rng(2).random((2, 3, 3)) > 0.5).astype(np.float32)
  nll = 0.5 * (z**2).sum(-1) - ld
  np.testing.assert_allclose(jax.jit(nll_loss)(z, ld), nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(nll_loss)(z, ld, w), (nll * w).sum() / w.sum(), rtol=1e-6)


def test_soft_clamp_bounds():
  s = jnp.array([-1e6, -1.0, 0.0, 1e-3, 1e6])
  out = soft_clamp(s, 3.0)
  assert float(out.max()) < 3.0 and float(out.min()) > -3.0
  np.testing.assert_allclose(out[3], 1e-3 * 2 / math.pi, rtol=1e-3)


def test_positional_encoding_by_hand():
  pe = positional_encoding(8, 3, 5)
  assert pe.shape == (3, 5, 8)
  for y in range(3):
    for x in range(5):
      ref = []
      for pos in (x, y):
        for i in range(2):
          f = 10000 ** (-2 * i / 4)
          ref += [math.sin(pos * f), math.cos(pos * f)]
      np.testing.assert_allclose(pe[y, x], ref, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    positional_encoding(6, 2, 2)


def test_adaptive_avg_pool_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ref = tnn.AdaptiveAvgPool2d(24)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(jax.jit(adaptive_avg_pool, static_argnums=1)(x, 24), ref, atol=1e-6)


def test_autoencoder_sizes_and_shape():
  assert encoder_sizes(24) == (12, 6, 3) and decoder_steps(24) == 5
  ae = FeatureAutoencoder(304, 304, channels=8)
  x = jnp.zeros((2, 24, 24, 304))
  params = ae.init(jax.random.key(0), x)["params"]
  assert set(params) == {"enc1", "enc2", "enc3", "bottleneck", *(f"dec{i}" for i in range(1, 6)), "out1", "out2"}
  assert jax.eval_shape(lambda: ae.apply({"params": params}, x)).shape == (2, 24, 24, 304)
  with pytest.raises(ValueError, match="square"):
    ae.init(jax.random.key(0), jnp.zeros((1, 24, 12, 304)))


def test_full_size_shapes():
  """The published configuration: 768 -> 24x24x304 features, student 336 -> 608, flow and AE 304 -> 304."""
  cfg = AstConfig()
  nets = method.build(cfg)
  assert (nets.channels, nets.grid, nets.pos_channels) == (304, 24, 32)
  shapes = jax.eval_shape(lambda k: method.init_params(nets, k, cfg.model.image_size), jax.random.key(0))
  f = jax.ShapeDtypeStruct((1, 24, 24, 304), jnp.float32)
  assert jax.eval_shape(
    lambda p, x: method.features(nets, p, x), shapes["backbone"], jax.ShapeDtypeStruct((1, 768, 768, 3), jnp.float32)
  ).shape == (1, 24, 24, 304)
  assert jax.eval_shape(lambda p, x: method.teacher(nets, p, x), shapes["flow"], f).shape == (1, 24, 24, 304)
  s = jax.eval_shape(
    lambda p, b, x: nets.student.apply({"params": p, "batch_stats": b}, x),
    shapes["student"],
    shapes["student_stats"],
    jax.ShapeDtypeStruct((1, 24, 24, 336), jnp.float32),
  )
  assert s.shape == (1, 24, 24, 608)
  assert shapes["student"]["conv_in"]["kernel"].shape == (3, 3, 336, 1024)
  assert len([k for k in shapes["student"] if k.endswith("_conv1")]) == 4
  assert shapes["flow"]["block0"]["g2"]["conv1"]["kernel"].shape == (3, 3, 152 + 32, 1024)


def test_b5_stage_table():
  specs = efficientnet.stage_specs(1.6, 2.2, 7)
  assert [len(s) for s in specs] == [3, 5, 5, 7, 7, 9, 3]
  assert [s[-1].cout for s in specs] == [24, 40, 64, 128, 176, 304, 512]
  assert efficientnet.stem_channels(1.6) == 48 and efficientnet.feature_stride(6) == 32
  with pytest.raises(ValueError, match="backbone.stages"):
    efficientnet.stage_specs(1.6, 2.2, 8)


def test_student_shape_and_modes():
  st = ResidualStudent(12, 10, hidden=8, blocks=2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 12))
  v = st.init(jax.random.key(1), x)
  y, upd = st.apply(v, x, train=True, mutable=["batch_stats"])
  assert y.shape == (2, 4, 4, 10)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], upd["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  assert st.apply(v, x).shape == (2, 4, 4, 10)


# --- EfficientNet parity with a PyTorch reference in torchvision's layout.


class _ConvBN(tnn.Sequential):
  def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
    layers = [
      tnn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
      tnn.BatchNorm2d(cout, eps=1e-3),
    ]
    super().__init__(*(layers + ([tnn.SiLU()] if act else [])))


class _SE(tnn.Module):
  def __init__(self, c, sq):
    super().__init__()
    self.fc1, self.fc2 = tnn.Conv2d(c, sq, 1), tnn.Conv2d(sq, c, 1)

  def forward(self, x):
    s = torch.sigmoid(self.fc2(tnn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True)))))
    return x * s


class _MB(tnn.Module):
  def __init__(self, spec):
    super().__init__()
    layers = [_ConvBN(spec.cin, spec.expanded, 1)] if spec.expand_ratio != 1 else []
    layers += [
      _ConvBN(spec.expanded, spec.expanded, spec.kernel, spec.stride, spec.expanded),
      _SE(spec.expanded, spec.squeeze),
      _ConvBN(spec.expanded, spec.cout, 1, act=False),
    ]
    self.block = tnn.Sequential(*layers)
    self.res = spec.stride == 1 and spec.cin == spec.cout

  def forward(self, x):
    return x + self.block(x) if self.res else self.block(x)


def _torch_trunk(width, depth, stages):
  torch.manual_seed(0)
  feats = [_ConvBN(3, efficientnet.stem_channels(width), 3, 2)]
  feats += [tnn.Sequential(*[_MB(s) for s in blocks]) for blocks in efficientnet.stage_specs(width, depth, stages)]
  model = tnn.Module()
  model.features = tnn.Sequential(*feats)
  with torch.no_grad():  # random BN statistics and affine terms, so the import of each is checked
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
  return model.eval()


def test_efficientnet_parity_with_torch(tmp_path):
  width, depth, stages = 0.25, 0.25, 6  # B5's stage table, narrow and shallow; the same Flax code path
  ref = _torch_trunk(width, depth, stages)
  path = tmp_path / "effnet.pth"
  torch.save(ref.state_dict(), path)
  params = efficientnet.params_from_torchvision(load_state_dict(str(path)), width, depth, stages)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  trunk = efficientnet.EfficientNetTrunk(width, depth, stages)
  got = np.asarray(jax.jit(lambda p, x: trunk.apply({"params": p}, x))(params, x))
  assert got.shape == want.shape == (2, 2, 2, efficientnet.feature_channels(width, stages))
  np.testing.assert_allclose(got, want, atol=1e-4 * float(want.std()), rtol=1e-4)


def test_efficientnet_import_errors():
  ref = _torch_trunk(0.25, 0.25, 2)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  del state["features.1.0.block.1.fc1.weight"]
  with pytest.raises(ValueError, match="features.1.0.block.1.fc1.weight"):
    efficientnet.params_from_torchvision(state, 0.25, 0.25, 2)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  with pytest.raises(ValueError, match="wrong shapes"):
    efficientnet.params_from_torchvision(state, 0.5, 0.25, 2)
