"""The student of EfficientAD-AST: a residual conv net on backbone features + positional encoding.

Input [B, h, w, C + P] (336 = 304 + 32 for B5), output [B, h, w, 2C] (608): channels [:C] predict the
teacher's z, [C:] the autoencoder's output (EfficientAD's two-headed student, on AST's feature grid).
  x = LeakyReLU(conv_in(x))
  4 x residual block: h = LeakyReLU(BN(conv(x))); h = BN(conv(h)); x = LeakyReLU(x + h)
  out = conv_out(x)
All convs kxk with padding k // 2 (grid kept) and PyTorch default init; width `hidden` (1024).
BatchNorm: batch statistics when `train=True` (the 'batch_stats' collection is then mutable), running
statistics otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from efficientad_jax.models.layers import conv


class ResidualStudent(nn.Module):
  in_channels: int
  out_channels: int
  hidden: int = 1024
  blocks: int = 4
  kernel: int = 3
  slope: float = 0.01
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    k, p = self.kernel, self.kernel // 2
    act = lambda v: nn.leaky_relu(v, self.slope)
    bn = lambda name: nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_eps,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name=name,
    )
    x = act(conv(self.hidden, k, self.in_channels, padding=p, dtype=self.dtype, name="conv_in")(x.astype(self.dtype)))
    for i in range(self.blocks):
      h = act(
        bn(f"res{i}_bn1")(conv(self.hidden, k, self.hidden, padding=p, dtype=self.dtype, name=f"res{i}_conv1")(x))
      )
      h = bn(f"res{i}_bn2")(conv(self.hidden, k, self.hidden, padding=p, dtype=self.dtype, name=f"res{i}_conv2")(h))
      x = act(x + h)
    return conv(self.out_channels, k, self.hidden, padding=p, dtype=self.dtype, name="conv_out")(x)
