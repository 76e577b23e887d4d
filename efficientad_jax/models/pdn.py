"""Patch description networks PDN-small and PDN-medium (paper section 3.1, docs/method.md §2).

NHWC. PyTorch semantics: cross-correlation, symmetric zero padding, bias on every conv, average pooling that
counts padded zeros. Unpadded (`padded=False`) for anomaly detection: 256x256 -> 56x56, each output pixel
sees a 33x33 patch. Padded only for teacher distillation: 256x256 -> 64x64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientad_jax.models.conv import conv_fn_for

# (kernel, in_channels_or_None_for_input, out_channels_or_None_for_C, padding_units, relu_after, pool_after)
# padding_units is multiplied by p = 1 if padded else 0 (docs/method.md §2.1: padding "3p", "p").
_SMALL = (
  (4, 3, 128, 3, True, True),
  (4, 128, 256, 3, True, True),
  (3, 256, 256, 1, True, False),
  (4, 256, None, 0, False, False),
)
_MEDIUM = (
  (4, 3, 256, 3, True, True),
  (4, 256, 512, 3, True, True),
  (1, 512, 512, 0, True, False),
  (3, 512, 512, 1, True, False),
  (4, 512, None, 0, True, False),
  (1, None, None, 0, False, False),
)
ARCHITECTURES = {"small": _SMALL, "medium": _MEDIUM}


def torch_default_init(fan_in: int):
  """PyTorch's Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

  The student and autoencoder train from scratch; keeping PyTorch's init keeps the paper's training dynamics.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(
  features: int,
  kernel: int,
  in_channels: int,
  *,
  padding: int = 0,
  stride: int = 1,
  dtype: Any = jnp.float32,
  impl: str = "auto",
  name: str,
) -> nn.Conv:
  """A PyTorch-equivalent Conv2d: symmetric zero padding, bias, PyTorch default init, float32 params.

  `impl` (ModelConfig.conv_impl) picks the backward pass only (models/conv.py: XLA:CPU's own weight gradient
  is ~20x slower than a matmul); parameters and forward numbers are those of `nn.Conv` whatever the impl.
  """
  init = torch_default_init(in_channels * kernel * kernel)
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=init,
    bias_init=init,
    conv_general_dilated=conv_fn_for(impl),
    name=name,
  )


class PDN(nn.Module):
  """PDN-small or PDN-medium with `out_channels` outputs (teacher 384, student 768).

  Input [B, H, W, 3] (ImageNet-normalised), output [B, h, w, out_channels] with h = pdn_output_size(H).
  Parameters are named conv1..conv4 (small) / conv1..conv6 (medium), as in anomalib's state_dicts.
  """

  size: str = "small"
  out_channels: int = 384
  padded: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # backward pass of the convs (models/conv.py); same params and forward numbers

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.size not in ARCHITECTURES:
      raise ValueError(f"PDN size must be one of {sorted(ARCHITECTURES)}, got {self.size!r}")
    p = 1 if self.padded else 0
    x = x.astype(self.dtype)
    for i, (k, cin, cout, pad, relu, pool) in enumerate(ARCHITECTURES[self.size], start=1):
      cin = self.out_channels if cin is None else cin
      cout = self.out_channels if cout is None else cout
      x = conv(cout, k, cin, padding=pad * p, dtype=self.dtype, impl=self.conv_impl, name=f"conv{i}")(x)
      if relu:
        x = nn.relu(x)
      if pool:
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding=((p, p), (p, p)), count_include_pad=True)
    return x


def pdn_output_size(size: Sequence[int], model_size: str = "small", padded: bool = False) -> tuple[int, ...]:
  """Spatial output size of the PDN for an input of spatial `size` (e.g. 256 -> 56 unpadded, 64 padded)."""
  p = 1 if padded else 0
  out = []
  for n in size:
    for k, _, _, pad, _, pool in ARCHITECTURES[model_size]:
      n = n + 2 * pad * p - k + 1
      if pool:
        n = (n + 2 * p - 2) // 2 + 1
    out.append(n)
  return tuple(out)
