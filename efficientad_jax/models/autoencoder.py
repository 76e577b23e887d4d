"""The convolutional autoencoder for logical anomalies (paper section 3.3, docs/method.md §3).

Encoder: 5 strided convs (k4 s2 p1) and a linear bottleneck conv that collapses the grid to 1x1 (k8 at 256).
Decoder: 6 x [bilinear resize, conv k4 s1 p2, ReLU, dropout], resize to the PDN output size, two k3 convs.
Bilinear resizes use half-pixel centres and NO antialias (PyTorch `interpolate(align_corners=False)`);
`jax.image.resize` antialiases when shrinking unless told not to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientad_jax.models.pdn import conv, torch_default_init

_ENCODER = ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64))  # (in, out) of the strided convs
_LATENT = 64


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
    for i, (cin, cout) in enumerate(_ENCODER, start=1):
      x = nn.relu(conv(cout, 4, cin, padding=1, stride=2, dtype=self.dtype, impl=self.conv_impl, name=f"enc{i}")(x))
    kh, kw = bottleneck_kernel(h), bottleneck_kernel(w)
    # Linear bottleneck (no ReLU). Rectangular kernel for non-square inputs: still a 1x1 code.
    x = nn.Conv(
      _LATENT,
      (kh, kw),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_init(_LATENT * kh * kw),
      bias_init=torch_default_init(_LATENT * kh * kw),
      name="enc6",
    )(x)
    for i, size in enumerate(zip(decoder_sizes(h), decoder_sizes(w)), start=1):
      x = resize(x, size)
      x = nn.relu(conv(_LATENT, 4, _LATENT, padding=2, dtype=self.dtype, impl=self.conv_impl, name=f"dec{i}")(x))
      x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    x = resize(x, self.out_size)
    x = nn.relu(conv(_LATENT, 3, _LATENT, padding=1, dtype=self.dtype, impl=self.conv_impl, name="dec7")(x))
    return conv(self.out_channels, 3, _LATENT, padding=1, dtype=self.dtype, impl=self.conv_impl, name="dec8")(x)
