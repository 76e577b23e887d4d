"""The config of teacher distillation on ImageNet (paper section 3.1; docs/method.md §8): its networks and
target, composed with the sections every method shares (`efficientad_jax.config`). Imports nothing but the
shared config module.

The student of this stage is the padded PDN at `model.image_size` (output image_size / 4); the target comes
from WideResNet layer2 / layer3 at `backbone.image_size`, so layer2's grid (backbone.image_size / 8) must equal
it (`distill.check_sizes`).
"""

from __future__ import annotations

import dataclasses

from efficientad_jax.config import (
  MODEL_SIZES,
  InputConfig,
  OptimConfig,
  Rule,
  ScheduleConfig,
  unit,
)


@dataclasses.dataclass(frozen=True)
class DistillModelConfig:
  """The PDN being distilled (EfficientAD's teacher)."""

  size: str = "small"  # PDN-S or PDN-M
  channels: int = 384  # teacher output channels = target channels
  image_size: int = 256  # student input

  def range_rules(self) -> list[Rule]:
    return [
      ("size", self.size in MODEL_SIZES, f"one of {MODEL_SIZES}"),
      ("channels", self.channels >= 1, ">= 1"),
      ("image_size", self.image_size >= 1, ">= 1"),
    ]


@dataclasses.dataclass(frozen=True)
class WideResNetConfig:
  """The frozen backbone: torchvision WideResNet-101-2 up to layer3 (`models.wide_resnet`)."""

  weights: str = ""  # torchvision wide_resnet101_2 state_dict .pth
  blocks: tuple[int, int, int] = (3, 4, 23)  # bottlenecks in layer1..3 (tests shrink these)
  planes: tuple[int, int, int] = (64, 128, 256)
  width: int = 2  # "wide": bottleneck width = planes * 2
  stem: int = 64
  image_size: int = 512  # backbone input (the same image as the student's)

  def range_rules(self) -> list[Rule]:
    return [
      ("blocks", len(self.blocks) == 3 and min(self.blocks) >= 1, "three values >= 1"),
      ("planes", len(self.planes) == 3 and min(self.planes) >= 1, "three values >= 1"),
      ("width", self.width >= 1, ">= 1"),
      ("stem", self.stem >= 1, ">= 1"),
      ("image_size", self.image_size >= 16 and self.image_size % 16 == 0, "a multiple of 16"),
    ]


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """The regression target: PatchCore's aggregation of layer2 / layer3, normalised per channel."""

  layer_dim: int = 1024  # each layer's unfolded 3x3 patch vector is pooled to this
  num_stat_images: int = 10_000  # target channel statistics (rounded down to whole batches)

  def range_rules(self) -> list[Rule]:
    return [("layer_dim", self.layer_dim >= 1, ">= 1"), ("num_stat_images", self.num_stat_images >= 1, ">= 1")]


@dataclasses.dataclass(frozen=True)
class DistillDataConfig(InputConfig):
  """ImageNet training images (`distillation.stream`)."""

  imagenet: str = ""  # image folder (searched recursively) or "tfds:imagenet2012"
  grayscale_prob: float = 0.1  # RandomGrayscale before both networks

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [("grayscale_prob", unit(self.grayscale_prob), "in [0, 1]")]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Teacher distillation: Adam 1e-4 / wd 1e-5 with no schedule, 60,000 steps of global batch 16."""

  model: DistillModelConfig = DistillModelConfig()
  backbone: WideResNetConfig = WideResNetConfig()
  target: TargetConfig = TargetConfig()
  optim: OptimConfig = OptimConfig(decay_factor=1.0)
  data: DistillDataConfig = DistillDataConfig()
  train: ScheduleConfig = ScheduleConfig(steps=60_000, batch_size=16)

  def range_rules(self) -> list[Rule]:
    """None across sections: the student / backbone grid match is `distill.check_sizes` (it needs the PDN)."""
    return []
