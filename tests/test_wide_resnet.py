"""WideResNet up to layer3 against an independent torch.nn reference (random weights, saved with torch.save,
imported through the torch-free .pth reader), the real 101-2 parameter count, and import errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from efficientad_jax.models import wide_resnet

TINY = {"blocks": (1, 1, 2), "planes": (4, 8, 16), "width_factor": 2, "stem": 8}


class RefBottleneck(nn.Module):
  """torchvision-style v1.5 bottleneck written from the architecture description."""

  def __init__(self, cin, planes, width, stride):
    super().__init__()
    cout = planes * 4
    self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefWideResNet(nn.Module):
  def __init__(self, blocks, planes, width_factor, stem, layers=3):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = stem
    for i, (n, p, s) in enumerate(zip(blocks, planes, (1, 2, 2, 2)[:layers]), start=1):
      mods = []
      for b in range(n):
        mods.append(RefBottleneck(cin, p, p * width_factor, s if b == 0 else 1))
        cin = p * 4
      setattr(self, f"layer{i}", nn.Sequential(*mods))

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    l1 = self.layer1(x)
    l2 = self.layer2(l1)
    return l2, self.layer3(l2)


def randomise(model, seed):
  """Random weights AND non-trivial running statistics (the default 0 / 1 would hide a mix-up)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var") or name.endswith(
        ("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")
      ):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
      else:
        t.copy_(torch.randn(t.shape, generator=g) * (0.3 if t.ndim == 1 else (2.0 / t[0].numel()) ** 0.5))
  return model.eval()


def save_tiny(path, seed=0, **overrides):
  cfg = dict(TINY, **overrides)
  ref = randomise(RefWideResNet(cfg["blocks"], cfg["planes"], cfg["width_factor"], cfg["stem"]), seed)
  torch.save(ref.state_dict(), path)
  return ref, wide_resnet.WideResNet(**cfg)


def test_matches_torch_reference_layer2_layer3(tmp_path):
  ref, net = save_tiny(tmp_path / "wrn.pth")
  variables = wide_resnet.load_backbone(tmp_path / "wrn.pth", net)
  x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
  with torch.no_grad():
    r2, r3 = (t.numpy().transpose(0, 2, 3, 1) for t in ref(torch.from_numpy(x)))
  l2, l3 = jax.jit(net.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert l2.shape == (2, 12, 12, 32) and l3.shape == (2, 6, 6, 64)  # strides 8 and 16, channels 4 planes
  for got, want in ((l2, r2), (l3, r3)):
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * want.std()


def test_real_wrn101_2_parameter_count_and_shapes():
  # Independent count: torchvision's wide_resnet101_2 has 126,886,696 parameters; the reference with layer4
  # on the meta device reproduces it, and the Flax net must equal the reference minus layer4 and fc.
  with torch.device("meta"):
    full = RefWideResNet((3, 4, 23, 3), (64, 128, 256, 512), 2, 64, layers=4)
  assert sum(p.numel() for p in full.parameters()) + 2048 * 1000 + 1000 == 126_886_696
  expected = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("layer4"))
  variables = wide_resnet.abstract_variables(wide_resnet.WideResNet())
  assert sum(v.size for v in jax.tree_util.tree_leaves(variables["params"])) == expected == 82_865_984
  out = jax.eval_shape(wide_resnet.WideResNet().apply, variables, jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
  assert out[0].shape == (1, 64, 64, 512) and out[1].shape == (1, 32, 32, 1024)
  # Every torch name the import expects exists in the reference's state_dict, and vice versa (minus layer4).
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  names = {wide_resnet.torch_key(p[0].key, [k.key for k in p[1:]]) for p, _ in flat}
  torch_names = {n for n in full.state_dict() if not n.startswith("layer4") and "num_batches" not in n}
  assert names == torch_names


def test_import_errors_name_the_keys(tmp_path):
  ref, net = save_tiny(tmp_path / "wrn.pth")
  state = ref.state_dict()
  state["fc.weight"] = torch.zeros(10, 64)  # ignored, like layer4 and num_batches_tracked
  del state["layer2.0.downsample.1.running_var"]
  torch.save(state, tmp_path / "missing.pth")
  with pytest.raises(wide_resnet.WeightsError, match=r"missing.pth.*layer2\.0\.downsample\.1\.running_var"):
    wide_resnet.load_backbone(tmp_path / "missing.pth", net)
  bad_shape = r"shape mismatch: layer3\.0\.bn1\.running_mean: expected \(16,\), got \(32,\)"
  with pytest.raises(wide_resnet.WeightsError, match=bad_shape):
    wide_resnet.load_backbone(tmp_path / "wrn.pth", wide_resnet.WideResNet(**dict(TINY, planes=(4, 8, 8))))
  with pytest.raises(wide_resnet.WeightsError, match=r"unexpected keys \['layer3\.1"):
    wide_resnet.load_backbone(tmp_path / "wrn.pth", wide_resnet.WideResNet(**dict(TINY, blocks=(1, 1, 1))))
