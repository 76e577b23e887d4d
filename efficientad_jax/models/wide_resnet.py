"""WideResNet-101-2 up to layer3, the frozen feature extractor of teacher distillation (paper §3.1; docs/method.md §8).

NHWC, inference only: batch norm uses the running statistics (eps 1e-5) and is never updated. The layout is
torchvision's ResNet v1.5 (the stride sits in the 3x3 conv of a bottleneck):
  stem:  conv 7x7 s2 p3 (no bias) . bn . ReLU . max pool 3x3 s2 p1
  layerL (L = 1, 2, 3; stride 1, 2, 2): blocks[L-1] bottlenecks
  bottleneck: conv 1x1 -> w . bn . ReLU . conv 3x3 s p1 w -> w . bn . ReLU . conv 1x1 w -> 4 planes . bn,
              plus the identity (or, in the first block of a layer, conv 1x1 s + bn), then ReLU;
              w = planes * width_factor ("wide": 2).
WideResNet-101-2: blocks (3, 4, 23[, 3 in layer4, unused]), planes (64, 128, 256), width_factor 2, so layer2
has 512 channels at stride 8 and layer3 1024 at stride 16. Smaller block counts / planes give the tests'
tiny variants of the SAME code.

Weights come from torchvision's `wide_resnet101_2` state_dict (`.pth`, read without torch): names
`conv1.weight`, `bn1.{weight,bias,running_mean,running_var,num_batches_tracked}`,
`layerL.B.{conv,bn}{1,2,3}.*`, `layerL.0.downsample.{0,1}.*`; layer4 and fc are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientad_jax.models.weights import (  # one error for weights that do not fit
  WeightsError,
  load_state_dict,
)

WRN101_2 = {"blocks": (3, 4, 23), "planes": (64, 128, 256), "width_factor": 2, "stem": 64}
EXPANSION = 4  # bottleneck output channels = planes * 4
_STRIDES = (1, 2, 2)  # layer1..layer3
_BN_EPS = 1e-5  # torchvision's BatchNorm2d default
_IGNORED = re.compile(r"^(fc|layer4)\.|\.num_batches_tracked$")  # in the file, not needed up to layer3


def _conv(features: int, kernel: int, stride: int, pad: int, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _bn(dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """[B, H, W, Cin] -> [B, H/stride, W/stride, planes * 4] (torchvision v1.5 bottleneck)."""

  planes: int
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out_channels = self.planes * EXPANSION
    y = nn.relu(_bn(self.dtype, "bn1")(_conv(self.width, 1, 1, 0, self.dtype, "conv1")(x)))
    y = nn.relu(_bn(self.dtype, "bn2")(_conv(self.width, 3, self.stride, 1, self.dtype, "conv2")(y)))
    y = _bn(self.dtype, "bn3")(_conv(out_channels, 1, 1, 0, self.dtype, "conv3")(y))
    if self.downsample:
      x = _bn(self.dtype, "downsample_bn")(_conv(out_channels, 1, self.stride, 0, self.dtype, "downsample_conv")(x))
    return nn.relu(y + x)


class WideResNet(nn.Module):
  """Input [B, H, W, 3] (ImageNet-normalised) -> (layer2 [B, H/8, W/8, 4 planes[1]],
  layer3 [B, H/16, W/16, 4 planes[2]]). Variables: {'params', 'batch_stats'} (frozen running stats)."""

  blocks: Sequence[int] = WRN101_2["blocks"]
  planes: Sequence[int] = WRN101_2["planes"]
  width_factor: int = WRN101_2["width_factor"]
  stem: int = WRN101_2["stem"]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if len(self.blocks) != 3 or len(self.planes) != 3 or min(self.blocks) < 1:
      raise ValueError(f"WideResNet needs 3 layers of >= 1 block, got blocks {self.blocks}, planes {self.planes}")
    x = nn.relu(_bn(self.dtype, "bn1")(_conv(self.stem, 7, 2, 3, self.dtype, "conv1")(x.astype(self.dtype))))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as PyTorch
    outputs, channels = [], self.stem
    for layer, (n, planes, stride) in enumerate(zip(self.blocks, self.planes, _STRIDES), start=1):
      for b in range(n):
        first = b == 0
        x = Bottleneck(
          planes,
          planes * self.width_factor,
          stride if first else 1,
          downsample=first and (stride != 1 or channels != planes * EXPANSION),
          dtype=self.dtype,
          name=f"layer{layer}_{b}",
        )(x)
        channels = planes * EXPANSION
      outputs.append(x)
    return outputs[1], outputs[2]


def from_config(cfg: Any, dtype: Any = jnp.float32) -> WideResNet:
  """The backbone of a config section with fields blocks, planes, width, stem (`WideResNetConfig`)."""
  return WideResNet(
    blocks=tuple(cfg.blocks), planes=tuple(cfg.planes), width_factor=cfg.width, stem=cfg.stem, dtype=dtype
  )


def abstract_variables(net: WideResNet) -> dict:
  """ShapeDtypeStructs of {'params', 'batch_stats'} (no memory, no compute; shapes don't depend on H, W)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(net.init, jax.random.key(0), x)


# Flax leaf -> torch suffix; torch names the bn affine `weight`, Flax `scale`.
_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def torch_key(collection: str, path: Sequence[str]) -> str:
  """('params', ('layer1_0', 'downsample_bn', 'scale')) -> 'layer1.0.downsample.1.weight'."""
  *modules, leaf = path
  names = []
  for m in modules:
    block = re.fullmatch(r"layer(\d)_(\d+)", m)
    names.append(f"layer{block[1]}.{block[2]}" if block else _MODULE.get(m, m))
  return ".".join(names + [_LEAF[(collection, leaf)]])


def variables_from_state(state: Mapping[str, Any], net: WideResNet, *, source: str = "state_dict") -> dict:
  """Flax variables {'params', 'batch_stats'} of `net` from a torchvision ResNet state_dict.

  Conv weights OIHW -> HWIO; everything float32. `fc.*`, `layer4.*` and `num_batches_tracked` are ignored.

  Raises:
    WeightsError: missing or unexpected keys, or shapes that do not fit `net` (all of them listed).
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_variables(net))[0]
  out, expected, errors = {}, set(), []
  for path, leaf in flat:
    names = [k.key for k in path]
    key = torch_key(names[0], names[1:])
    expected.add(key)
    if key not in state:
      continue
    array = np.asarray(state[key], np.float32)
    if array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)
    if array.shape != leaf.shape:
      errors.append(f"{key}: expected {_torch_shape(leaf.shape)}, got {np.shape(state[key])}")
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.ascontiguousarray(array)
  missing = sorted(expected - set(state))
  unexpected = sorted(k for k in set(state) - expected if not _IGNORED.search(k))
  if missing or unexpected:
    raise WeightsError(
      f"{source}: not a state_dict of this WideResNet (blocks {tuple(net.blocks)}, planes "
      f"{tuple(net.planes)}, width x{net.width_factor}): {len(missing)} missing keys "
      f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
    )
  if errors:
    raise WeightsError(
      f"{source}: shape mismatch: " + "; ".join(errors[:8]) + (f" (+{len(errors) - 8} more)" if len(errors) > 8 else "")
    )
  return out


def _torch_shape(hwio: tuple) -> tuple:
  return (hwio[3], hwio[2], hwio[0], hwio[1]) if len(hwio) == 4 else tuple(hwio)


def load_backbone(path: str, net: WideResNet) -> dict:
  """`variables_from_state` of a `.pth` file, read without torch (efficientad_jax.files.pth)."""
  return variables_from_state(load_state_dict(path), net, source=str(path))
