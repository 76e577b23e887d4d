"""EfficientAD's autoencoder adapted to AST's feature input (C channels on a g x g grid, 304 x 24 x 24).

Encoder: conv k4 s2 p1 + ReLU while the grid side is > 3 (24 -> 12 -> 6 -> 3), then a linear bottleneck conv
spanning the remaining grid (a 1x1 code of `latent` channels). Decoder: [nearest-neighbour upsampling x2,
conv k3 p1, ReLU, dropout] until the side reaches g (1 -> 2 -> ... -> 32), adaptive average pooling to g x g,
conv k3 p1 + ReLU, conv k3 p1 to C outputs (predicting the teacher's z). PyTorch default init.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from efficientad_jax.models.layers import conv


def encoder_sizes(g: int) -> tuple[int, ...]:
  """Grid sides after each strided conv: 24 -> (12, 6, 3)."""
  sizes = []
  while g > 3:
    g = (g + 2 - 4) // 2 + 1
    sizes.append(g)
  return tuple(sizes)


def decoder_steps(g: int) -> int:
  """Number of x2 upsamplings from 1 until the side is >= g (24 -> 5, i.e. 32)."""
  n, side = 0, 1
  while side < g:
    side, n = 2 * side, n + 1
  return n


def adaptive_avg_pool(x: jnp.ndarray, out: int) -> jnp.ndarray:
  """PyTorch AdaptiveAvgPool2d on [B, H, W, C]: output cell i averages rows floor(iH/out) .. ceil((i+1)H/out)-1.

  Written as two averaging matrices (static shapes), so any H >= 1 works.
  """

  def matrix(n: int) -> np.ndarray:
    m = np.zeros((out, n), np.float32)
    for i in range(out):
      lo, hi = (i * n) // out, -(-((i + 1) * n) // out)
      m[i, lo:hi] = 1.0 / (hi - lo)
    return m

  mh, mw = matrix(x.shape[1]), matrix(x.shape[2])
  return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x)


class FeatureAutoencoder(nn.Module):
  """[B, g, g, C] features -> [B, g, g, out_channels]; `deterministic=False` needs the 'dropout' rng."""

  in_channels: int
  out_channels: int
  channels: int = 64
  dropout: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
    g = x.shape[1]
    if x.shape[2] != g:
      raise ValueError(f"FeatureAutoencoder expects a square grid, got {x.shape[1:3]}")
    x, cin = x.astype(self.dtype), self.in_channels
    sizes = encoder_sizes(g)
    for i, _ in enumerate(sizes, start=1):
      x = nn.relu(conv(self.channels, 4, cin, padding=1, stride=2, dtype=self.dtype, name=f"enc{i}")(x))
      cin = self.channels
    k = sizes[-1] if sizes else g
    x = conv(self.channels, k, cin, dtype=self.dtype, name="bottleneck")(x)  # linear, 1x1 code
    for i in range(1, decoder_steps(g) + 1):
      b, h, w, c = x.shape
      x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
      x = nn.relu(conv(self.channels, 3, self.channels, padding=1, dtype=self.dtype, name=f"dec{i}")(x))
      x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    x = adaptive_avg_pool(x, g)
    x = nn.relu(conv(self.channels, 3, self.channels, padding=1, dtype=self.dtype, name="out1")(x))
    return conv(self.out_channels, 3, self.channels, padding=1, dtype=self.dtype, name="out2")(x)
