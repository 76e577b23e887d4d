"""Teacher distillation's target and pure step (docs/method.md §8, paper section 3.1).

Target for an image at backbone.image_size (512): WideResNet-101-2 layer2 F2 [64, 64, 512] and layer3 F3
[32, 32, 1024]. Per layer, every pixel's 3x3 neighbourhood is unfolded (stride 1, zero pad 1, channel-major
like `torch.nn.functional.unfold`: index c * 9 + 3 * dy + dx) and the 9C vector adaptively average-pooled to
`target.layer_dim` (1024); layer3's grid is resized bilinearly (half-pixel, no antialias) to layer2's; the two
vectors are stacked [layer2 | layer3] (2048) and pooled to `channels` (384) -> target [64, 64, 384]
(PatchCore's aggregation). Pooling after unfolding is linear per pixel, so it is computed as a fixed 3x3 conv
(or a 3x3 mean when bins cover whole channels) and never materialises the 9C vectors; resizing commutes with
it (one acts on pixels, the other on channels).

The student (padded PDN, model.image_size -> image_size / 4 = 64) regresses the per-channel normalised target with
MSE; only the student is differentiated, the backbone is a frozen argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efficientad_jax.distillation.config import DistillConfig
from efficientad_jax.efficientad import normalization
from efficientad_jax.efficientad.losses import mse
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.models import PDN, pdn_output_size, resize, wide_resnet
from efficientad_jax.training import parallel
from efficientad_jax.training.optim import TrainState

_HIGHEST = jax.lax.Precision.HIGHEST  # the pooling is an average: keep it exact, not TF32


def adaptive_pool_matrix(length: int, out: int) -> jnp.ndarray:
  """[length, out] float32 matrix P with v @ P = PyTorch adaptive_avg_pool1d(v, out).

  Bin o averages v[start_o:end_o], start_o = floor(o * length / out), end_o = ceil((o + 1) * length / out).
  Built from iotas inside jit (a few KB of constants instead of a length x out literal in the program).
  """
  o = np.arange(out)
  start = jnp.asarray(o * length // out)
  end = jnp.asarray(-((-(o + 1) * length) // out))  # ceil division
  i = jnp.arange(length)[:, None]
  inside = (i >= start) & (i < end)
  return inside.astype(jnp.float32) / (end - start).astype(jnp.float32)


def unfold_pool(x: jnp.ndarray, out: int) -> jnp.ndarray:
  """adaptive_avg_pool1d(unfold_3x3(x), out) per pixel: [B, H, W, C] -> [B, H, W, out] float32.

  unfold: stride 1, zero pad 1, channel-major (c * 9 + 3 * dy + dx). The composition is linear, i.e. a 3x3
  conv with kernel P reshaped to [C, 3, 3, out]; when every bin holds k whole channels (9C = 9 k out, e.g.
  layer3 1024 -> 1024) it is a 3x3 mean (zeros counted) followed by a mean over k channels.
  """
  x = x.astype(jnp.float32)
  c = x.shape[-1]
  if c % out == 0:  # every bin = 9 k consecutive values = k whole channels
    k = c // out
    y = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))) / 9.0
    return y.reshape(*y.shape[:-1], out, k).mean(-1)
  kernel = adaptive_pool_matrix(9 * c, out).reshape(c, 3, 3, out).transpose(1, 2, 0, 3)  # HWIO
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST
  )


def aggregate(layer2: jnp.ndarray, layer3: jnp.ndarray, layer_dim: int, channels: int) -> jnp.ndarray:
  """[B, h, w, C2], [B, h/2, w/2, C3] -> [B, h, w, channels] float32: the distillation target (module doc)."""
  f2 = unfold_pool(layer2, layer_dim)
  f3 = resize(unfold_pool(layer3, layer_dim), layer2.shape[1:3])
  stacked = jnp.concatenate([f2, f3], axis=-1)  # layer-major, as PatchCore stacks per-layer vectors
  return jnp.einsum("bhwl,lo->bhwo", stacked, adaptive_pool_matrix(2 * layer_dim, channels), precision=_HIGHEST)


def target_features(
  backbone: wide_resnet.WideResNet, cfg: DistillConfig, variables: dict, images: jnp.ndarray
) -> jnp.ndarray:
  """Backbone images [B, 2S, 2S, 3] -> raw (unnormalised) target [B, S/4, S/4, channels]."""
  layer2, layer3 = backbone.apply(variables, images)
  return aggregate(layer2, layer3, cfg.target.layer_dim, cfg.model.channels)


def check_sizes(cfg: DistillConfig) -> None:
  """The student's padded-PDN grid must equal layer2's grid (backbone.image_size / 8)."""
  m, size = cfg.model, cfg.backbone.image_size
  student = pdn_output_size((m.image_size,), m.size, padded=True)[0]
  if size % 16 or student != size // 8:
    raise ValueError(
      f"padded PDN-{m.size} on {m.image_size}^2 gives {student}^2, but layer2 of the {size}^2 "
      f"backbone input is {size / 8:g}^2 (and backbone.image_size must be a multiple of 16): use "
      "backbone.image_size = 2 * model.image_size"
    )


def distill_step(
  student: PDN,
  backbone: wide_resnet.WideResNet,
  cfg: DistillConfig,
  tx: optax.GradientTransformation,
  state: TrainState,
  backbone_vars: dict,
  stats: TeacherStats,
  batch: dict[str, jnp.ndarray],
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One update: L = mean((S(image) - (target(backbone) - mean) / std)^2). Only the student is differentiated."""
  target = normalization.normalize_teacher(target_features(backbone, cfg, backbone_vars, batch["backbone"]), stats)
  target = jax.lax.stop_gradient(target)
  loss_fn = lambda p: mse(student.apply({"params": p}, batch["image"]).astype(jnp.float32), target)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, tx), {"loss": loss}


def compile_distill_step(
  student: PDN,
  backbone: wide_resnet.WideResNet,
  cfg: DistillConfig,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> Callable:
  """`distill_step` jitted data-parallel (batch on 'data', the rest replicated, state donated).

  Returns fn(state, backbone_vars, stats, batch) -> (state, {'loss'}).
  """
  return parallel.compile_step(
    functools.partial(distill_step, student, backbone, cfg, tx), mesh, "rrrd", "rr", donate=(0,)
  )
