"""The custom-VJP conv (models/conv.py): same forward numbers and parameters as nn.Conv, same gradients as
XLA's own differentiation (the independent reference), for single convs and for one full train step (the
PDN-S student and the autoencoder through all four losses), all under jit. The implementation is chosen
explicitly (`ModelConfig.conv_impl`), never by a global switch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientad_jax import models
from efficientad_jax.config import Config, ModelConfig, TrainConfig
from efficientad_jax.efficientad import train_step
from efficientad_jax.models import conv as conv_lib
from efficientad_jax.models.pdn import conv as pdn_conv
from tests.test_train_step import _tiny_setup

CUSTOM = ("im2col", "shifted")  # the custom-VJP weight gradients (each checked on every conv shape below)
MODEL = ("shifted", "mixed")  # what a model trains with on CPU: "mixed" (auto) = "shifted" + XLA's own


def _assert_trees_close(a, b, rtol=2e-4, atol=1e-5):
  """Relative to each leaf's scale: float32 sums in another order differ by a few ulps of the largest term."""

  def check(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * max(1.0, np.abs(y).max()))

  jax.tree_util.tree_map(check, a, b)


@pytest.mark.parametrize("method", CUSTOM)
@pytest.mark.parametrize(
  "kernel,stride,padding",
  [(4, 1, 0), (4, 1, 1), (4, 1, 2), (4, 1, 3), (3, 1, 1), (4, 2, 1), (3, 2, 0), (1, 1, 0), (8, 1, 0)],
)
def test_single_conv_gradients_match_xla(method, kernel, stride, padding):
  rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
  x = jnp.asarray(rng.normal(size=(2, 17, 19, 5)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32))
  strides, pads = (stride, stride), ((padding, padding), (padding, padding))

  def loss(fn, x, w):
    y = fn(x, w)
    return jnp.sum(jnp.sin(y) * y)  # a non-trivial output gradient

  plain = functools.partial(conv_lib._forward, strides=strides, padding=pads)
  custom = lambda x, w: conv_lib._conv(x, w, strides, pads, method)
  y_plain, y_custom = jax.jit(plain)(x, w), jax.jit(custom)(x, w)
  np.testing.assert_array_equal(y_custom, y_plain)
  g_plain = jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1)))(x, w)
  g_custom = jax.jit(jax.grad(functools.partial(loss, custom), argnums=(0, 1)))(x, w)
  _assert_trees_close(g_custom, g_plain)


def test_factory_keeps_nn_conv_parameters_and_forward():
  """Same parameter names, shapes and init values as a bare nn.Conv, identical forward numbers."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12, 12, 3)).astype(np.float32))
  ours = pdn_conv(8, 4, 3, padding=2, stride=2, name="c")
  init = models.pdn.torch_default_init(3 * 4 * 4)
  bare = nn.Conv(8, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), kernel_init=init, bias_init=init)
  p_ours, p_bare = ours.init(jax.random.key(0), x), bare.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_bare)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_ours, p_bare)
  assert p_ours["params"]["kernel"].shape == (4, 4, 3, 8) and p_ours["params"]["bias"].shape == (8,)
  for impl in ("xla",) + CUSTOM:
    ours = pdn_conv(8, 4, 3, padding=2, stride=2, impl=impl, name="c")
    np.testing.assert_array_equal(jax.jit(ours.apply)(p_ours, x), jax.jit(bare.apply)(p_bare, x))


def test_full_train_step_gradients_match_xla():
  """The gradients of one PDN-S train step (all four losses, dropout on) at 64x64, one model per conv_impl.
  It covers every conv of the student and the autoencoder (strided, padded, 3 to 768 channels). The teacher,
  the batch and the key are arguments, not constants of the jitted program: as constants XLA folds the
  teacher's forward pass and the dropout masks at compile time (nearly twice the CPU time of the whole test)."""
  grads = {}
  for impl in ("xla",) + MODEL:
    cfg = Config(model=ModelConfig(image_size=64, conv_impl=impl), train=TrainConfig(steps=10))
    nets, _, state, frozen, batch = _tiny_setup(cfg, batch_size=1)
    losses = functools.partial(train_step.compute_losses, nets, cfg)  # (trainable, frozen, batch, key)
    grad = jax.jit(jax.grad(lambda *args: losses(*args)["loss"]))
    grads[impl] = grad(state.params, frozen, batch, jax.random.key(3))
  for impl in MODEL:
    _assert_trees_close(grads[impl], grads["xla"])


def test_auto_resolves_by_backend_and_bad_names_fail():
  expected = conv_lib.CPU_IMPL if jax.default_backend() == "cpu" else "xla"
  assert conv_lib.resolve_impl("auto") == expected
  assert conv_lib.resolve_impl("xla") == "xla"
  with pytest.raises(ValueError, match="conv_impl"):
    conv_lib.resolve_impl("cudnn")
  assert ModelConfig().conv_impl == "auto"


def test_model_config_selects_the_backward_implementation():
  """ModelConfig.conv_impl reaches the convs: 'xla' traces plain convs, 'shifted' the custom-VJP conv."""
  from efficientad_jax import models
  from efficientad_jax.config import ModelConfig

  def forward_jaxpr(impl):
    nets = models.build(ModelConfig(image_size=64, conv_impl=impl))
    x = jnp.zeros((1, 64, 64, 3))
    params = jax.eval_shape(lambda k: nets.student.init(k, x), jax.random.key(0))["params"]
    apply = lambda p: nets.student.apply({"params": p}, x)
    return str(jax.make_jaxpr(apply)(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), params)))

  assert "custom_vjp" not in forward_jaxpr("xla")
  assert forward_jaxpr("shifted").count("custom_vjp") >= 4  # all four convs of PDN-S
  # "mixed": only conv1 (3 input channels) is custom; conv2-4 (128-256 channels, stride 1) are XLA's own.
  assert forward_jaxpr("mixed").count("custom_vjp_call") == 1
