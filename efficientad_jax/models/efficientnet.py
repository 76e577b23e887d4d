"""The EfficientNet feature trunk of EfficientAD-AST, in torchvision's layout, and its `.pth` import.

NHWC, inference only (BatchNorm uses its stored statistics; they are plain parameters here because the
backbone is never trained). Architecture as torchvision's `efficientnet_b*` (Tan & Le 2019, table 1):
  features.0   stem: conv 3x3 s2 (no bias), BN, SiLU
  features.1-7 MBConv stages: [expand 1x1, BN, SiLU] (when ratio != 1) -> depthwise kxk, BN, SiLU ->
               squeeze-excitation (avg pool, 1x1 fc1, SiLU, 1x1 fc2, sigmoid; squeeze width = block input // 4)
               -> project 1x1, BN; identity shortcut when stride 1 and in == out (stochastic depth: eval = id)
Channels are `make_divisible(c * width, 8)`, depths `ceil(n * depth)`; convs pad (k - 1) // 2 symmetrically.
B5 = width 1.6, depth 2.2, BN eps 1e-3: cut after features.6 -> 304 channels at stride 32 (24x24 at 768).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# EfficientNet-B0 stages (torchvision's table): (expand_ratio, kernel, stride, in, out, layers).
_B0_STAGES = (
  (1, 3, 1, 32, 16, 1),
  (6, 3, 2, 16, 24, 2),
  (6, 5, 2, 24, 40, 2),
  (6, 3, 2, 40, 80, 3),
  (6, 5, 1, 80, 112, 3),
  (6, 5, 2, 112, 192, 4),
  (6, 3, 1, 192, 320, 1),
)


class BlockSpec(NamedTuple):
  expand_ratio: int
  kernel: int
  stride: int
  cin: int
  cout: int

  @property
  def expanded(self) -> int:
    return make_divisible(self.cin * self.expand_ratio)

  @property
  def squeeze(self) -> int:
    return max(1, self.cin // 4)


def make_divisible(v: float, divisor: int = 8) -> int:
  """Nearest multiple of `divisor` (at least `divisor`), never more than 10 % below v (MobileNet's rule)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def stage_specs(width: float, depth: float, stages: int) -> tuple[tuple[BlockSpec, ...], ...]:
  """Blocks of features.1..features.<stages>: the first block of a stage strides and changes width."""
  if not 1 <= stages <= len(_B0_STAGES):
    raise ValueError(f"backbone.stages must be in 1..{len(_B0_STAGES)}, got {stages}")
  out = []
  for ratio, k, stride, cin, cout, layers in _B0_STAGES[:stages]:
    cin, cout = make_divisible(cin * width), make_divisible(cout * width)
    n = int(math.ceil(layers * depth))
    out.append(tuple(BlockSpec(ratio, k, stride if j == 0 else 1, cin if j == 0 else cout, cout) for j in range(n)))
  return tuple(out)


def stem_channels(width: float) -> int:
  return make_divisible(_B0_STAGES[0][3] * width)


def feature_channels(width: float, stages: int) -> int:
  """Channels of the cut trunk: 304 for B5 (width 1.6) cut after features.6."""
  return stage_specs(width, 1.0, stages)[-1][-1].cout


def feature_stride(stages: int) -> int:
  return 2 * math.prod(s[2] for s in _B0_STAGES[:stages])


class ConvBN(nn.Module):
  """Conv (no bias) + inference BatchNorm: y = (conv(x) - mean) / sqrt(var + eps) * scale + bias."""

  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  eps: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = (self.kernel - 1) // 2
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=(self.stride, self.stride),
      padding=((p, p), (p, p)),
      feature_group_count=self.groups,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="conv",
    )(x)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    scale = self.param("scale", ones, (self.features,))
    bias = self.param("bias", zeros, (self.features,))
    mean = self.param("mean", zeros, (self.features,))
    var = self.param("var", ones, (self.features,))
    mul = scale * jax.lax.rsqrt(var + self.eps)
    return x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype)


class MBConv(nn.Module):
  spec: BlockSpec
  eps: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = self.spec
    h = x
    if s.expand_ratio != 1:
      h = nn.silu(ConvBN(s.expanded, 1, eps=self.eps, dtype=self.dtype, name="expand")(h))
    h = nn.silu(
      ConvBN(s.expanded, s.kernel, s.stride, groups=s.expanded, eps=self.eps, dtype=self.dtype, name="depthwise")(h)
    )
    se = jnp.mean(h, axis=(1, 2), keepdims=True)
    se = nn.silu(nn.Conv(s.squeeze, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="se_fc1")(se))
    se = nn.sigmoid(nn.Conv(s.expanded, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="se_fc2")(se))
    h = ConvBN(s.cout, 1, eps=self.eps, dtype=self.dtype, name="project")(h * se)
    return x + h if s.stride == 1 and s.cin == s.cout else h


class EfficientNetTrunk(nn.Module):
  """Input [B, H, W, 3] (ImageNet-normalised) -> features [B, H/32, W/32, C] for stages=6 (C=304 for B5).

  Parameters: stem/{conv,scale,bias,mean,var}, stage<i>/block<j>/{expand,depthwise,se_fc1,se_fc2,project}.
  """

  width: float = 1.6
  depth: float = 2.2
  stages: int = 6
  eps: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.silu(
      ConvBN(stem_channels(self.width), 3, 2, eps=self.eps, dtype=self.dtype, name="stem")(x.astype(self.dtype))
    )
    for i, blocks in enumerate(stage_specs(self.width, self.depth, self.stages), start=1):
      for j, spec in enumerate(blocks):
        x = MBConv(spec, self.eps, self.dtype, name=f"stage{i}_block{j}")(x)
    return x


# --- Import from a torchvision state_dict.


def _hwio(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


def _conv_bn(state: Mapping[str, np.ndarray], prefix: str) -> dict:
  """torchvision Conv2dNormActivation `<prefix>.0` (conv) and `<prefix>.1` (BN)."""
  return {
    "conv": {"kernel": _hwio(state[f"{prefix}.0.weight"])},
    "scale": state[f"{prefix}.1.weight"],
    "bias": state[f"{prefix}.1.bias"],
    "mean": state[f"{prefix}.1.running_mean"],
    "var": state[f"{prefix}.1.running_var"],
  }


def _se(state: Mapping[str, np.ndarray], prefix: str, name: str) -> dict:
  return {"kernel": _hwio(state[f"{prefix}.{name}.weight"]), "bias": state[f"{prefix}.{name}.bias"]}


def params_from_torchvision(state: Mapping[str, Any], width: float, depth: float, stages: int) -> dict:
  """Flax params of `EfficientNetTrunk` from a torchvision EfficientNet state_dict (NumPy arrays).

  Keys past features.<stages> (later stages, the classifier) are ignored; a missing or misshapen key raises
  ValueError naming it. Indices inside `block`: 0 expand (if ratio != 1), then depthwise, SE, project.
  """
  state = {k: np.asarray(v, np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
  try:
    params: dict = {"stem": _conv_bn(state, "features.0")}
    for i, blocks in enumerate(stage_specs(width, depth, stages), start=1):
      for j, spec in enumerate(blocks):
        p, k = f"features.{i}.{j}.block", 0
        block = {}
        if spec.expand_ratio != 1:
          block["expand"], k = _conv_bn(state, f"{p}.{k}"), k + 1
        block["depthwise"] = _conv_bn(state, f"{p}.{k}")
        block["se_fc1"], block["se_fc2"] = _se(state, f"{p}.{k + 1}", "fc1"), _se(state, f"{p}.{k + 1}", "fc2")
        block["project"] = _conv_bn(state, f"{p}.{k + 2}")
        params[f"stage{i}_block{j}"] = block
  except KeyError as e:
    raise ValueError(
      f"torchvision EfficientNet state_dict: missing key {e.args[0]!r} (width {width}, depth "
      f"{depth}, {stages} stages: is it efficientnet_b5's state_dict?)"
    ) from None
  expected = jax.eval_shape(EfficientNetTrunk(width, depth, stages).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))[
    "params"
  ]
  got, want = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(expected, sep="/")
  mismatched = sorted(k for k in want if k not in got or got[k].shape != want[k].shape)
  if mismatched:
    raise ValueError(f"torchvision EfficientNet state_dict: wrong shapes at {mismatched[:5]}")
  return params


def load_torchvision(path: str, width: float, depth: float, stages: int) -> dict:
  """Reads a torchvision `.pth` state_dict without torch (`efficientad_jax.files.pth`) and converts it."""
  from efficientad_jax.files import pth

  return params_from_torchvision(pth.load_state_dict(path), width, depth, stages)
