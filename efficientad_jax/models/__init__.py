"""The three networks of EfficientAD and `build(model_cfg)` to construct them consistently."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientad_jax.config import ImageSize, ModelConfig
from efficientad_jax.models.autoencoder import Autoencoder, decoder_sizes, resize
from efficientad_jax.models.pdn import PDN, pdn_output_size

__all__ = [
  "PDN",
  "Autoencoder",
  "Models",
  "build",
  "init_params",
  "init_network",
  "pdn_output_size",
  "decoder_sizes",
  "resize",
  "count_params",
]


class Models(NamedTuple):
  teacher: nn.Module  # PDN, C outputs, frozen
  student: nn.Module  # PDN, 2C outputs: [:C] predicts the teacher, [C:] the autoencoder
  autoencoder: nn.Module  # C outputs at the PDN output size


def build(cfg: ModelConfig, *, padded_teacher: bool = False) -> Models:
  """The teacher, student and autoencoder for `cfg` (size, channels, input size, compute dtype)."""
  dtype = jnp.dtype(cfg.dtype)
  c = cfg.teacher_channels
  out_size = pdn_output_size(cfg.network_size, cfg.size)  # the networks see a tile, or the whole image
  if min(out_size) < 1:
    raise ValueError(f"input size {cfg.network_size} is too small for PDN-{cfg.size}")
  return Models(
    teacher=PDN(cfg.size, c, padded=padded_teacher, dtype=dtype, conv_impl=cfg.conv_impl),
    student=PDN(cfg.size, 2 * c, dtype=dtype, conv_impl=cfg.conv_impl),
    autoencoder=Autoencoder(
      out_size=out_size, out_channels=c, dropout=cfg.ae_dropout, dtype=dtype, conv_impl=cfg.conv_impl
    ),
  )


def init_params(models: Models, key: jax.Array, image_size: int | Sequence[int]) -> dict:
  """Fresh parameters {'teacher', 'student', 'autoencoder'} (PyTorch default init), in one compiled program.

  The parameters do not depend on the conv backward (`conv_impl`), so every implementation shares one
  compilation of the initialisation."""
  plain = Models(*(m.clone(conv_impl="xla") for m in models))
  return _init(plain, key, ImageSize(image_size))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(models: Models, key: jax.Array, image_size: ImageSize) -> dict:
  x = jnp.zeros((1, *image_size, 3), jnp.float32)
  kt, ks, ka = jax.random.split(key, 3)
  return {
    "teacher": models.teacher.init(kt, x)["params"],
    "student": models.student.init(ks, x)["params"],
    "autoencoder": models.autoencoder.init(ka, x)["params"],
  }


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_network(network: nn.Module, key: jax.Array, image_size: ImageSize) -> dict:
  """Fresh parameters of one network (PyTorch default init) for [1, H, W, 3] inputs, compiled once per
  (network, size) in a process."""
  return network.init(key, jnp.zeros((1, *image_size, 3), jnp.float32))["params"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
