"""The teacher of EfficientAD-AST: a conditional normalizing flow on feature maps, and the positional encoding.

Flow (Rudolph et al., "Asymmetric Student-Teacher Networks", WACV 2023, section 3.2), NHWC, per block k:
  x <- x[..., perm_k]                         fixed random channel permutation (seeded, not trained)
  x = [x1 | x2]                               split channels C1 = C // 2, C2 = C - C1
  (s2, t2) = g2([x1 | cond]);  y2 = x2 * exp(c(s2)) + t2
  (s1, t1) = g1([y2 | cond]);  y1 = x1 * exp(c(s1)) + t1
  log|det J| += sum_c c(s1) + sum_c c(s2)     per position
with the soft clamp c(s) = (2 / pi) * clamp * atan(s / clamp) in (-clamp, clamp), and each subnet g a conv
kxk -> ReLU -> conv kxk (hidden width `hidden`, PyTorch default init). Because every coupling is triangular,
log|det| of the whole map is the sum of the per-position terms. Negative log-likelihood per position:
  nll = 0.5 * ||z||^2 - log|det J|   (constants dropped), averaged over positions (weighted by a mask).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from efficientad_jax.models.layers import conv


def positional_encoding(channels: int, h: int, w: int) -> np.ndarray:
  """2-D sinusoidal encoding [h, w, channels] (CFLOW-AD): channels [:D] encode x, [D:] encode y, D = C/2;
  within each half, even channels sin(p * f_i), odd cos(p * f_i), f_i = 10000^(-2i / D), p the integer column
  (row) index."""
  if channels % 4:
    raise ValueError(f"pos_channels must be a multiple of 4, got {channels}")
  d = channels // 2
  freq = np.exp(np.arange(0, d, 2) * -(math.log(10000.0) / d))
  pe = np.zeros((h, w, channels), np.float32)
  px = np.arange(w)[:, None] * freq  # [w, d/2]
  py = np.arange(h)[:, None] * freq  # [h, d/2]
  pe[:, :, 0:d:2] = np.sin(px)[None]
  pe[:, :, 1:d:2] = np.cos(px)[None]
  pe[:, :, d::2] = np.sin(py)[:, None]
  pe[:, :, d + 1 :: 2] = np.cos(py)[:, None]
  return pe


def soft_clamp(s: jnp.ndarray, clamp: float) -> jnp.ndarray:
  return (2.0 / math.pi) * clamp * jnp.arctan(s / clamp)


class Subnet(nn.Module):
  """[B, h, w, cin] -> (log-scale, shift), each [B, h, w, cout]."""

  cin: int
  cout: int
  hidden: int
  kernel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    p = self.kernel // 2
    x = nn.relu(conv(self.hidden, self.kernel, self.cin, padding=p, dtype=self.dtype, name="conv1")(x))
    x = conv(2 * self.cout, self.kernel, self.hidden, padding=p, dtype=self.dtype, name="conv2")(x)
    x = x.astype(jnp.float32)
    return x[..., : self.cout], x[..., self.cout :]


class Coupling(nn.Module):
  """One affine coupling block (module doc) with its permutation; forward and inverse."""

  channels: int
  cond_channels: int
  hidden: int
  kernel: int
  clamp: float
  perm: tuple[int, ...]
  dtype: Any = jnp.float32

  def setup(self):
    c1 = self.channels // 2
    c2 = self.channels - c1
    self.c1 = c1
    self.g2 = Subnet(c1 + self.cond_channels, c2, self.hidden, self.kernel, self.dtype)
    self.g1 = Subnet(c2 + self.cond_channels, c1, self.hidden, self.kernel, self.dtype)

  def _st(self, g, x, cond):
    s, t = g(jnp.concatenate([x, cond], axis=-1).astype(self.dtype))
    return soft_clamp(s, self.clamp), t

  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = x[..., np.asarray(self.perm)]
    x1, x2 = x[..., : self.c1], x[..., self.c1 :]
    s2, t2 = self._st(self.g2, x1, cond)
    y2 = x2 * jnp.exp(s2) + t2
    s1, t1 = self._st(self.g1, y2, cond)
    y1 = x1 * jnp.exp(s1) + t1
    return jnp.concatenate([y1, y2], axis=-1), jnp.sum(s1, -1) + jnp.sum(s2, -1)

  def inverse(self, y: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    y1, y2 = y[..., : self.c1], y[..., self.c1 :]
    s1, t1 = self._st(self.g1, y2, cond)
    x1 = (y1 - t1) * jnp.exp(-s1)
    s2, t2 = self._st(self.g2, x1, cond)
    x2 = (y2 - t2) * jnp.exp(-s2)
    return jnp.concatenate([x1, x2], axis=-1)[..., np.argsort(self.perm)]


def permutations(channels: int, blocks: int, seed: int) -> tuple[tuple[int, ...], ...]:
  rng = np.random.default_rng(seed)
  return tuple(tuple(int(i) for i in rng.permutation(channels)) for _ in range(blocks))


class ConditionalFlow(nn.Module):
  """features [B, h, w, C] float32, cond [B, h, w, P] -> (z [B, h, w, C], log|det J| [B, h, w]).

  `inverse(z, cond)` maps back (used by the tests). Parameters: block<k>/{g1,g2}/{conv1,conv2}.
  """

  channels: int
  cond_channels: int
  blocks: int = 4
  hidden: int = 1024
  kernel: int = 3
  clamp: float = 3.0
  seed: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    perms = permutations(self.channels, self.blocks, self.seed)
    self.couplings = [
      Coupling(
        self.channels, self.cond_channels, self.hidden, self.kernel, self.clamp, perms[k], self.dtype, name=f"block{k}"
      )
      for k in range(self.blocks)
    ]

  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = x.astype(jnp.float32)
    logdet = jnp.zeros(x.shape[:3], jnp.float32)
    for block in self.couplings:
      x, ld = block(x, cond)
      logdet = logdet + ld
    return x, logdet

  def inverse(self, z: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    for block in reversed(self.couplings):
      z = block.inverse(z, cond)
    return z


def nll_loss(z: jnp.ndarray, logdet: jnp.ndarray, weight: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean over positions of 0.5 * ||z||^2 - log|det J|; z [B, h, w, C], logdet and weight [B, h, w].

  With a weight (a foreground mask downsampled to the feature grid), the weighted mean sum(w * nll) / sum(w).
  """
  nll = 0.5 * jnp.sum(jnp.square(z.astype(jnp.float32)), axis=-1) - logdet
  if weight is None:
    return jnp.mean(nll)
  return jnp.sum(weight * nll) / jnp.maximum(jnp.sum(weight), 1e-6)
