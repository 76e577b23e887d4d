"""The conv layer shared by the AST networks: PyTorch Conv2d semantics and default init, float32 params.

Plain `nn.Conv` (XLA's own differentiation, so forward-mode autodiff works: the flow's log-det test takes
`jax.jacfwd` through it).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Conv2d default for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv(
  features: int,
  kernel: int,
  in_channels: int,
  *,
  padding: int = 0,
  stride: int = 1,
  dtype: Any = jnp.float32,
  name: str,
) -> nn.Conv:
  init = torch_init(in_channels * kernel * kernel)
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=init,
    bias_init=init,
    name=name,
  )
