"""The config of EfficientAD-AST (method 'efficientad_ast'): its own networks and epoch schedule, composed with
the sections every method shares (`efficientad_jax.config`). Imports nothing but the shared config module."""

from __future__ import annotations

import dataclasses

from efficientad_jax.config import (
  DTYPES,
  DataConfig,
  OptimConfig,
  Rule,
  RunConfig,
  ScoreConfig,
  unit,
)


@dataclasses.dataclass(frozen=True)
class AstModelConfig:
  """The input size, the student and the feature autoencoder (2C student outputs: [:C] predicts the
  teacher, [C:] the autoencoder)."""

  image_size: int = 768  # network input side; features are image_size / 32
  dtype: str = "float32"  # compute dtype of the trained nets; maps and losses stay float32
  pos_channels: int = 32  # 2-D sinusoidal positional encoding: half for x, half for y
  student_hidden: int = 1024
  student_blocks: int = 4
  student_kernel: int = 3
  leaky_slope: float = 0.01  # PyTorch LeakyReLU default
  bn_momentum: float = 0.9  # Flax convention (= PyTorch momentum 0.1)
  bn_eps: float = 1e-5
  ae_channels: int = 64
  ae_dropout: float = 0.2

  def range_rules(self) -> list[Rule]:
    return [
      ("image_size", self.image_size >= 1, ">= 1 (a multiple of the backbone stride: method.build)"),
      ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
      ("pos_channels", self.pos_channels >= 4 and self.pos_channels % 4 == 0, "a multiple of 4, >= 4"),
      ("student_hidden", self.student_hidden >= 1, ">= 1"),
      ("student_blocks", self.student_blocks >= 1, ">= 1"),
      ("student_kernel", self.student_kernel % 2 == 1, "odd"),
      ("bn_momentum", unit(self.bn_momentum), "in [0, 1]"),
      ("bn_eps", self.bn_eps > 0, "> 0"),
      ("ae_channels", self.ae_channels >= 1, ">= 1"),
      ("ae_dropout", 0 <= self.ae_dropout < 1, "in [0, 1)"),
    ]


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
  """The frozen backbone: torchvision EfficientNet (B5: width 1.6, depth 2.2, BN eps 1e-3) cut after
  features.<stages>."""

  weights: str = ""  # torchvision efficientnet_b5 state_dict .pth; "" = random weights (demo only)
  width: float = 1.6
  depth: float = 2.2
  stages: int = 6  # features.0..6 -> 304 channels at stride 32
  bn_eps: float = 1e-3

  def range_rules(self) -> list[Rule]:
    return [
      ("width", self.width > 0, "> 0"),
      ("depth", self.depth > 0, "> 0"),
      ("stages", 1 <= self.stages <= 7, "in [1, 7]"),
      ("bn_eps", self.bn_eps > 0, "> 0"),
    ]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """The teacher: a conditional affine-coupling flow."""

  blocks: int = 4
  hidden: int = 1024
  kernel: int = 3
  clamp: float = 3.0  # log-scales soft-clamped to (-clamp, clamp)
  seed: int = 0  # the fixed channel permutations

  def range_rules(self) -> list[Rule]:
    return [
      ("blocks", self.blocks >= 1, ">= 1"),
      ("hidden", self.hidden >= 1, ">= 1"),
      ("kernel", self.kernel % 2 == 1, "odd"),
      ("clamp", self.clamp > 0, "> 0"),
    ]


@dataclasses.dataclass(frozen=True)
class AstScheduleConfig(RunConfig):
  """Two stages counted in epochs (checkpoint_every too): the flow, then student + autoencoder with early
  stopping on the validation-normal loss."""

  flow_epochs: int = 240
  student_epochs: int = 100  # maximum
  patience_fraction: float = 0.1  # patience = max(1, int(fraction * student_epochs)) epochs

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [
      ("flow_epochs", self.flow_epochs >= 1, ">= 1"),
      ("student_epochs", self.student_epochs >= 1, ">= 1"),
      ("patience_fraction", unit(self.patience_fraction), "in [0, 1]"),
    ]


@dataclasses.dataclass(frozen=True)
class AstConfig:
  """EfficientAD-AST (method 'efficientad_ast', package `efficientad_jax.efficientad_ast`): EfficientNet-B5 features +
  2-D positional encoding, a conditional normalizing-flow teacher, a residual conv student and a
  feature-space autoencoder. Published: MVTec AD image/pixel AU-ROC 96.98 / 94.00, LOCO 73.3 / 73.5.

  Both stages: Adam with coupled L2 weight decay at a constant learning rate. Maps: combined = st_weight *
  map_st + ae_weight * map_ae, no normalisation, no padding; score = max.
  """

  model: AstModelConfig = AstModelConfig()
  backbone: EfficientNetConfig = EfficientNetConfig()
  flow: FlowConfig = FlowConfig()
  optim: OptimConfig = OptimConfig(learning_rate=2e-4, decay_factor=1.0)
  maps: ScoreConfig = ScoreConfig()
  data: DataConfig = DataConfig()
  train: AstScheduleConfig = AstScheduleConfig(batch_size=8, checkpoint_every=10)

  def range_rules(self) -> list[Rule]:
    """The rules across sections (full field names)."""
    d = self.data
    return [
      (
        "data.penalty_resize",
        not d.penalty or d.penalty_resize >= self.model.image_size,
        ">= model.image_size when data.penalty is set",
      )
    ]
