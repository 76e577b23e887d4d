"""Typed configuration tree. Every constant of the method lives here (docs/method.md §2-§7).

Configs are frozen dataclasses: plain data, hashable (so they can be static arguments of `jax.jit`),
and serialisable to JSON for the saved model. Every method's config (`Config` here, `ast.config.AstConfig`,
`distill_config.DistillConfig`) is composed of sections; the sections all methods share (`OptimConfig`,
`InputConfig`, `RunConfig` and their extensions) are defined once here, with their range rules.
`experiments/configs/*.py` build configs with `get_config()`; `override(cfg, ["train.steps=100", ...])`
applies command-line overrides with type checking, `validate(cfg)` checks every section's ranges
(`config_tree.py`, the operations on any config tree).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

# The generic tree operations, re-exported: configs are used through this module.
from efficientad_jax.config_tree import (  # noqa: F401
  ConfigError,
  Rule,
  changed_fields,
  flat_fields,
  from_dict,
  override,
  rules,
  to_dict,
  to_json,
  validate,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_SIZES = ("small", "medium")
DTYPES = ("float32", "bfloat16", "float16")
CONV_IMPLS = ("auto", "xla", "im2col", "shifted", "mixed")  # conv backward passes (models/conv.py)
DATASETS = ("synthetic", "mvtec_ad", "mvtec_loco", "visa", "folder")  # the dataset layouts (data/indexes.py)


def unit(v: float) -> bool:
  return 0 <= v <= 1


class ImageSize(tuple):
  """The networks' input size (H, W): `256` is a square, `'192x384'` is H x W (`--set model.image_size=192x384`).

  A tuple of two ints, so it is hashable (a static argument of jit) and JSON writes it as [H, W]; built from an
  int, 'S', 'HxW', or any pair. `str()` gives the command-line form back.
  """

  def __new__(cls, value: Any = 256) -> ImageSize:
    if isinstance(value, str):
      try:
        hw = [int(v) for v in value.lower().split("x")]
      except ValueError:
        raise ConfigError(f"image size {value!r}: give S or HxW in pixels, e.g. 256 or 192x384") from None
    elif isinstance(value, (int, np.integer)):
      hw = [int(value)]
    else:
      hw = [int(v) for v in value]
    if len(hw) == 1:
      hw = hw * 2
    if len(hw) != 2:
      raise ConfigError(f"image size {value!r}: give S or HxW in pixels, e.g. 256 or 192x384")
    return super().__new__(cls, hw)

  def __str__(self) -> str:
    return f"{self[0]}" if self[0] == self[1] else f"{self[0]}x{self[1]}"

  __repr__ = __str__

  def __getnewargs__(self) -> tuple:  # pickling (grain workers): rebuilt from the pair
    return (tuple(self),)


def _autoencoder_side(n: int) -> bool:
  return n % 32 == 0 and n >= 64


def _autoencoder_sizes(size: ImageSize) -> str:
  """The autoencoder's size rule (docs/method.md §3) and the valid sizes nearest `size`, per side."""
  options = []
  for n in size:
    below, above = max(64, n // 32 * 32), max(64, -(-n // 32) * 32)
    options.append([below] if below == above or n < 64 else [below, above])
  if size[0] == size[1]:
    nearest = " or ".join(str(n) for n in options[0])
  else:
    nearest = " or ".join(f"{h}x{w}" for h in options[0] for w in options[1])
  return (
    f"a multiple of 32, at least 64, on each side (the autoencoder's encoder halves the image five times and its "
    f"bottleneck spans the rest): nearest valid {nearest}"
  )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Networks (paper §3.1, §3.3; docs/method.md §2-§3)."""

  size: str = "small"  # "small" | "medium": PDN-S or PDN-M
  teacher_channels: int = 384  # student outputs 2x this: [:C] predicts the teacher, [C:] the autoencoder
  image_size: ImageSize = ImageSize(256)  # images are resized to H x W = image_size (`ImageSize`: 256 or '192x384')
  # Tiles (efficientad_jax/tiles.py, docs/method.md §7.5): 0 = off, the networks see the whole image (the paper);
  # T > 0: they see T x T tiles of it, overlapping by tile_overlap pixels, and the maps are stitched back.
  tile: int = 0
  tile_overlap: int = 32
  dtype: str = "float32"  # compute dtype; params, statistics and maps stay float32
  ae_dropout: float = 0.2  # decoder dropout rate (training only)
  # Conv backward pass (models/conv.py): "auto" = "mixed" on CPU (matmul weight gradients where XLA:CPU's
  # own are slow), XLA's elsewhere; "xla" | "im2col" | "shifted" | "mixed" force one. Same parameters and
  # forward numbers.
  conv_impl: str = "auto"

  def __post_init__(self) -> None:  # 256, '192x384' or a JSON [H, W] (saved configs) -> ImageSize
    object.__setattr__(self, "image_size", ImageSize(self.image_size))

  @property
  def network_size(self) -> ImageSize:
    """What the networks see: a tile, or the whole image."""
    return ImageSize(self.tile) if self.tile else self.image_size

  def range_rules(self) -> list[Rule]:
    tiled = self.tile > 0
    return [
      ("size", self.size in MODEL_SIZES, f"one of {MODEL_SIZES}"),
      ("teacher_channels", self.teacher_channels >= 1, ">= 1"),
      (
        "image_size",
        min(self.image_size) >= self.tile if tiled else all(map(_autoencoder_side, self.image_size)),
        f"at least model.tile = {self.tile} on each side" if tiled else _autoencoder_sizes(self.image_size),
      ),
      (
        "tile",
        self.tile == 0 or _autoencoder_side(self.tile),
        "0 (off), or " + _autoencoder_sizes(ImageSize(self.tile)),
      ),
      ("tile_overlap", not tiled or 0 <= self.tile_overlap < self.tile, "in [0, model.tile)"),
      ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
      ("ae_dropout", 0 <= self.ae_dropout < 1, "in [0, 1)"),
      ("conv_impl", self.conv_impl in CONV_IMPLS, f"one of {CONV_IMPLS}"),
    ]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Training objective (paper §3.2-§3.3; docs/method.md §5)."""

  hard_quantile: float = 0.999  # L_hard averages the squared errors >= this quantile

  def range_rules(self) -> list[Rule]:
    return [("hard_quantile", unit(self.hard_quantile), "in [0, 1]")]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam with coupled L2 weight decay, step decay of the learning rate (docs/method.md §6); every method's
  optimizer (`optim.make_optimizer`). decay_factor 1.0 is a constant learning rate."""

  learning_rate: float = 1e-4
  weight_decay: float = 1e-5  # coupled L2 (PyTorch Adam(weight_decay=)), not AdamW
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  decay_at_fraction: float = 0.95  # lr x decay_factor from step decay_at_fraction * steps
  decay_factor: float = 0.1

  def range_rules(self) -> list[Rule]:
    return [
      ("learning_rate", self.learning_rate > 0, "> 0"),
      ("weight_decay", self.weight_decay >= 0, ">= 0"),
      ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
      ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
      ("eps", self.eps > 0, "> 0"),
      ("decay_at_fraction", unit(self.decay_at_fraction), "in [0, 1]"),
      ("decay_factor", self.decay_factor > 0, "> 0"),
    ]


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """The combined map and the decision threshold (EfficientAD and AST): combined = st_weight * st +
  ae_weight * ae; the threshold is a quantile of validation image scores."""

  st_weight: float = 0.5
  ae_weight: float = 0.5
  threshold_quantile: float = 0.99

  def range_rules(self) -> list[Rule]:
    return [
      ("st_weight", self.st_weight >= 0, ">= 0"),
      ("ae_weight", self.ae_weight >= 0, ">= 0"),
      ("threshold_quantile", unit(self.threshold_quantile), "in [0, 1]"),
    ]


@dataclasses.dataclass(frozen=True)
class MapConfig(ScoreConfig):
  """Map normalisation and post-processing (paper §3.4; docs/method.md §7): st' and ae' are the maps with the
  validation quantiles q_start -> 0 and q_end -> scale."""

  q_start: float = 0.9  # quantile of validation map values mapped to 0
  q_end: float = 0.995  # quantile of validation map values mapped to `scale`
  scale: float = 0.1
  pad: int = 4  # zero padding per side of the 56x56 combined map before resizing

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [
      ("q_start", unit(self.q_start), "in [0, 1]"),
      ("q_end", unit(self.q_end) and self.q_end > self.q_start, "in [0, 1] and > maps.q_start"),
      ("scale", self.scale > 0, "> 0"),
      ("pad", self.pad >= 0, ">= 0"),
    ]


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """How every method's images become network input: ImageNet normalisation and the grain loader."""

  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  tfds_data_dir: str = ""  # TFDS data_dir ("" = TFDS default), for any "tfds:..." source
  # grain worker processes decoding and augmenting (0: threads of the main process). -1 = auto: none on a
  # CPU-only machine (XLA's step needs the cores there, and it, not the feed, bounds the speed), else one per
  # core beyond the first, at most MAX_AUTO_WORKERS (data/pipeline.py `worker_count`).
  num_workers: int = -1
  prefetch: int = 2  # batches read ahead (per worker)

  def range_rules(self) -> list[Rule]:
    return [
      ("mean", len(self.mean) == 3, "three values"),
      ("std", all(s > 0 for s in self.std) and len(self.std) == 3, "three values > 0"),
      ("num_workers", self.num_workers >= -1, ">= 0, or -1 (auto)"),
      ("prefetch", self.prefetch >= 0, ">= 0"),
    ]


@dataclasses.dataclass(frozen=True)
class DataConfig(InputConfig):
  """Anomaly detection datasets and preprocessing (docs/method.md §4)."""

  dataset: str = "synthetic"  # synthetic | mvtec_ad | mvtec_loco | visa | folder
  root: str = ""  # dataset folder (extracted archive); synthetic: where to generate it
  download: bool = False  # root missing: download the published archive there first (efficientad_jax/download.py)
  category: str = ""  # MVTec/VisA category; synthetic: its object name
  penalty: str = ""  # "" (off), an image folder, or "tfds:imagenette" / "tfds:imagenet2012"
  validation_fraction: float = 0.1  # MVTec AD, VisA, folder: n - int((1 - f) * n) of n train images held out (seeded)
  jitter_low: float = 0.8  # autoencoder input: brightness, contrast or saturation factor U(low, high)
  jitter_high: float = 1.2
  penalty_resize: int = 512  # penalty image: resize to this square, then centre-crop model.image_size (H x W)
  penalty_grayscale_prob: float = 0.3
  synthetic_size: int = 64  # synthetic dataset: image side in pixels
  synthetic_train: int = 40  # synthetic dataset: number of normal training images
  synthetic_layout: str = "mvtec_ad"  # synthetic dataset: "mvtec_ad" | "mvtec_loco" folder layout
  synthetic_test: int = 8  # synthetic dataset: good test images, and test images per defect type
  synthetic_validation: int = 8  # synthetic LOCO layout: images in validation/good
  synthetic_seed: int = 0  # synthetic dataset: its own seed (the data stay fixed across runs)
  source: str = "files"  # "files": index the extracted folder | "tfds": our TFDS builders
  # Training images decoded once per run into a memory-mapped uint8 file (data/cache.py), read by every worker;
  # false decodes every image at every use (the same values, slower).
  decode_cache: bool = True

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [
      ("dataset", self.dataset in DATASETS, f"one of {DATASETS}"),
      (
        "validation_fraction",
        0 < self.validation_fraction < 1,
        "in (0, 1): calibration needs held-out validation images",
      ),
      ("jitter_low", 0 <= self.jitter_low <= self.jitter_high, "in [0, data.jitter_high]"),
      ("penalty_grayscale_prob", unit(self.penalty_grayscale_prob), "in [0, 1]"),
      ("synthetic_size", self.synthetic_size >= 16, ">= 16"),
      ("synthetic_train", self.synthetic_train >= 2, ">= 2 (training and validation images)"),
      ("synthetic_layout", self.synthetic_layout in ("mvtec_ad", "mvtec_loco"), "mvtec_ad or mvtec_loco"),
      ("synthetic_test", self.synthetic_test >= 1, ">= 1"),
      ("synthetic_validation", self.synthetic_validation >= 1, ">= 1"),
      ("source", self.source in ("files", "tfds"), "files or tfds"),
    ]


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What every training run has: one seed, a global batch, resumable checkpoints."""

  seed: int = 0
  # Global batch. EfficientAD splits it over the largest number of devices that divides it
  # (parallel.data_parallel_devices); AST and distillation need it divisible by the device count.
  batch_size: int = 1
  checkpoint_every: int = 5_000  # steps (AST: epochs)
  max_to_keep: int = 2

  def range_rules(self) -> list[Rule]:
    return [
      ("batch_size", self.batch_size >= 1, ">= 1"),
      ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
      ("max_to_keep", self.max_to_keep >= 1, ">= 1"),
    ]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(RunConfig):
  """A run counted in optimizer steps (EfficientAD, teacher distillation)."""

  steps: int = 70_000
  log_every: int = 100

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [("steps", self.steps >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1")]


@dataclasses.dataclass(frozen=True)
class TrainConfig(ScheduleConfig):
  """EfficientAD's training loop (docs/method.md §5-§6): global batch 1 as in the paper."""

  teacher_checkpoint: str = ""  # orbax teacher from experiments.import_teacher; "" = random teacher
  # Optimizer steps per jitted call (a lax.scan over K stacked batches; train_step.train_steps). Same results as
  # K = 1, bit for bit; logging, NaN checks and checkpoints happen at call boundaries, so a K that divides
  # log_every and checkpoint_every keeps every call the same length (one compile).
  steps_per_dispatch: int = 1

  def range_rules(self) -> list[Rule]:
    return super().range_rules() + [("steps_per_dispatch", self.steps_per_dispatch >= 1, ">= 1")]


@dataclasses.dataclass(frozen=True)
class Config:
  """EfficientAD (method 'efficientad')."""

  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  maps: MapConfig = MapConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()

  def range_rules(self) -> list[Rule]:
    """The rules across sections (full field names)."""
    return [
      (
        "data.penalty_resize",
        self.data.penalty_resize >= max(self.model.network_size),
        ">= the networks' input side (model.image_size, or model.tile with tiles)",
      )
    ]


# Fields a resumed run may change (docs: BUILD_NOTES.md "Errors and resuming with other settings"): none changes the
# networks, the checkpointed state's shapes, or which images the data stream draws in which order.
RESUMABLE = frozenset(
  {
    "optim.learning_rate",  # the divergence advice; Adam's moments do not depend on it
    "train.steps",  # extend or shorten a run (the decay point, decay_at_fraction * steps, moves with it)
    "train.log_every",
    "train.checkpoint_every",
    "train.max_to_keep",
    "data.root",
    "data.download",
    "data.tfds_data_dir",
    "data.num_workers",
    "data.prefetch",
    "data.decode_cache",
    "train.steps_per_dispatch",  # how many steps one jitted call runs: the same steps, bit for bit
    "model.conv_impl",  # same parameters and forward numbers, another backward implementation
  }
)


def from_json(text: str, cls: type = Config) -> Any:
  return from_dict(cls, json.loads(text))
