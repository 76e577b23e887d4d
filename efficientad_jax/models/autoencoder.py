"""The convolutional autoencoder for logical anomalies (paper section 3.3, docs/method.md §3).

Encoder: 5 strided convs (k4 s2 p1) and a linear bottleneck conv that collapses the grid to 1x1 (k8 at 256).
Decoder: 6 x [bilinear resize, conv k4 s1 p2, ReLU, dropout], resize to the PDN output size, two k3 convs.
`ARCHITECTURE` is that list, layer by layer: the Flax module, the PyTorch weight mapping (`models.weights`) and
the ONNX graph (`serving.onnx_graph`) all read it.
Bilinear resizes use half-pixel centres and NO antialias (PyTorch `interpolate(align_corners=False)`);
`jax.image.resize` antialiases when shrinking unless told not to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientad_jax.models.pdn import conv, torch_default_init


class Layer(NamedTuple):
  """One conv of the autoencoder and what surrounds it; `ARCHITECTURE` lists them in order."""

  name: str  # the parameter name (anomalib's)
  kernel: int  # 0: the bottleneck, whose kernel spans the encoder's grid (`bottleneck_kernel`)
  cin: int
  cout: int | None  # None: the output width C (the teacher's channels)
  stride: int
  pad: int  # symmetric zero padding
  relu: bool
  resize: int | None  # a bilinear resize before the conv: index into `decoder_sizes`, -1 the output size
  dropout: bool  # training only, after the ReLU
  torch_index: int  # the module's index in nelson1425's nn.Sequential (PyTorch weight files)


# docs/method.md §3: 5 strided convs, the linear bottleneck, 6 x (resize, conv, ReLU, dropout), resize, 2 convs.
ARCHITECTURE = (
  Layer("enc1", 4, 3, 32, 2, 1, True, None, False, 0),
  Layer("enc2", 4, 32, 32, 2, 1, True, None, False, 2),
  Layer("enc3", 4, 32, 64, 2, 1, True, None, False, 4),
  Layer("enc4", 4, 64, 64, 2, 1, True, None, False, 6),
  Layer("enc5", 4, 64, 64, 2, 1, True, None, False, 8),
  Layer("enc6", 0, 64, 64, 1, 0, False, None, False, 10),
  *(Layer(f"dec{i}", 4, 64, 64, 1, 2, True, i - 1, True, 12 + 4 * (i - 1)) for i in range(1, 7)),
  Layer("dec7", 3, 64, 64, 1, 1, True, -1, False, 36),
  Layer("dec8", 3, 64, None, 1, 1, False, None, False, 38),
)


def decoder_sizes(n: int) -> tuple[int, ...]:
  """Intermediate sizes of the decoder for input side n: 256 -> (3, 8, 15, 32, 63, 127) (anomalib's rule).

  Clamped at 1 so that images down to 64 px (the tests' tiny models) stay valid.
  """
  return tuple(max(1, s) for s in (n // 64 - 1, n // 32, n // 16 - 1, n // 8, n // 4 - 1, n // 2 - 1))


def bottleneck_kernel(n: int) -> int:
  """The bottleneck conv spans the whole encoder grid (n / 32): 8 at 256, so the latent code is 1x1."""
  if n % 32 or n < 64:
    raise ValueError(f"autoencoder input side must be a multiple of 32 and >= 64, got {n}")
  return n // 32


def resize(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """Bilinear resize of [B, H, W, C] to [B, *size, C]; half-pixel centres, no antialias."""
  shape = (x.shape[0], size[0], size[1], x.shape[3])
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


class Autoencoder(nn.Module):
  """Input [B, H, W, 3] -> [B, *out_size, out_channels]; params enc1..enc6, dec1..dec8.

  `deterministic=False` enables dropout and needs the 'dropout' rng (training only).
  """

  out_size: tuple[int, int] = (56, 56)
  out_channels: int = 384
  dropout: float = 0.2
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # backward pass of the convs (models/conv.py); same params and forward numbers

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
    h, w = x.shape[1:3]
    x = x.astype(self.dtype)
    sizes = tuple(zip(decoder_sizes(h), decoder_sizes(w)))
    for layer in ARCHITECTURE:
      if layer.resize is not None:
        x = resize(x, self.out_size if layer.resize < 0 else sizes[layer.resize])
      cout = layer.cout or self.out_channels
      if layer.kernel:
        x = conv(
          cout,
          layer.kernel,
          layer.cin,
          padding=layer.pad,
          stride=layer.stride,
          dtype=self.dtype,
          impl=self.conv_impl,
          name=layer.name,
        )(x)
      else:  # the bottleneck: a rectangular kernel for non-square inputs, still a 1x1 code
        kh, kw = bottleneck_kernel(h), bottleneck_kernel(w)
        fan_in = layer.cin * kh * kw
        x = nn.Conv(
          cout,
          (kh, kw),
          padding="VALID",
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=torch_default_init(fan_in),
          bias_init=torch_default_init(fan_in),
          name=layer.name,
        )(x)
      if layer.relu:
        x = nn.relu(x)
      if layer.dropout:
        x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    return x
