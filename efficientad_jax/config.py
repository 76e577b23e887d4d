"""Typed configuration tree. Every constant of the method lives here (SPEC.md, sections 1-4).

Configs are frozen dataclasses: plain data, hashable (so they can be static arguments of `jax.jit`),
and serialisable to JSON for the saved model. `experiments/configs/*.py` build them with `get_config()`;
`override(cfg, ["train.steps=100", ...])` applies command-line overrides with type checking.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Networks (SPEC section 1)."""

  size: str = "small"  # "small" | "medium": PDN-S or PDN-M
  teacher_channels: int = 384  # student outputs 2x this: [:C] predicts the teacher, [C:] the autoencoder
  image_size: int = 256  # networks see image_size x image_size
  dtype: str = "float32"  # compute dtype; params, statistics and maps stay float32
  ae_dropout: float = 0.2  # decoder dropout rate (training only)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Training objective (SPEC section 3)."""

  hard_quantile: float = 0.999  # L_hard averages the squared errors >= this quantile


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam with coupled L2 weight decay, step decay of the learning rate (SPEC section 3)."""

  learning_rate: float = 1e-4
  weight_decay: float = 1e-5  # coupled L2 (PyTorch Adam(weight_decay=)), not AdamW
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  decay_at_fraction: float = 0.95  # lr x decay_factor from step decay_at_fraction * steps
  decay_factor: float = 0.1


@dataclasses.dataclass(frozen=True)
class MapConfig:
  """Map normalisation and post-processing (SPEC section 4)."""

  q_start: float = 0.9  # quantile of validation map values mapped to 0
  q_end: float = 0.995  # quantile of validation map values mapped to `scale`
  scale: float = 0.1
  st_weight: float = 0.5  # combined = st_weight * st' + ae_weight * ae'
  ae_weight: float = 0.5
  pad: int = 4  # zero padding per side of the 56x56 combined map before resizing
  threshold_quantile: float = 0.99  # decision threshold: this quantile of validation image scores


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Datasets and preprocessing (SPEC section 2)."""

  dataset: str = "synthetic"  # synthetic | mvtec_ad | mvtec_loco | visa | folder
  root: str = ""  # dataset folder (extracted archive); synthetic: where to generate it
  category: str = ""  # MVTec/VisA category; synthetic: its object name
  penalty: str = ""  # "" (off), an image folder, or "tfds:imagenette" / "tfds:imagenet2012"
  validation_fraction: float = 0.1  # MVTec AD and VisA: seeded share of train held out
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  jitter_low: float = 0.8  # autoencoder input: brightness, contrast or saturation factor U(low, high)
  jitter_high: float = 1.2
  penalty_resize: int = 512  # penalty image: resize to this, then centre-crop model.image_size
  penalty_grayscale_prob: float = 0.3
  synthetic_size: int = 64  # synthetic dataset: image side in pixels
  synthetic_train: int = 40  # synthetic dataset: number of normal training images
  synthetic_layout: str = "mvtec_ad"  # synthetic dataset: "mvtec_ad" | "mvtec_loco" folder layout
  synthetic_test: int = 8  # synthetic dataset: good test images, and test images per defect type
  synthetic_validation: int = 8  # synthetic LOCO layout: images in validation/good
  synthetic_seed: int = 0  # synthetic dataset: its own seed (the data stay fixed across runs)
  source: str = "files"  # "files": index the extracted folder | "tfds": our TFDS builders
  tfds_data_dir: str = ""  # TFDS data_dir ("" = TFDS default); also for "tfds:imagenette" penalty
  num_workers: int = 0  # grain worker processes (0: in the main process)
  prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop (SPEC section 3)."""

  steps: int = 70_000
  seed: int = 0
  batch_per_device: int = 1  # normal images per device per step (and as many penalty images)
  teacher_checkpoint: str = ""  # orbax teacher from experiments.import_teacher; "" = random teacher
  checkpoint_every: int = 5_000
  max_to_keep: int = 2
  log_every: int = 100


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  maps: MapConfig = MapConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
  """Inverse of `to_dict` for nested dataclasses; unknown keys are an error."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
  kwargs = {}
  for key, value in d.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      kwargs[key] = from_dict(hint, value)
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
  return from_dict(Config, json.loads(text))


def _parse(text: str, hint: Any, where: str) -> Any:
  if hint is bool:
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"{where}: expected a boolean, got {text!r}")
  origin = typing.get_origin(hint)
  if origin is tuple:
    item = typing.get_args(hint)[0]
    return tuple(_parse(t, item, where) for t in text.split(","))
  try:
    return hint(text)
  except ValueError:
    raise ValueError(f"{where}: expected {hint.__name__}, got {text!r}") from None


def override(cfg: Any, assignments: Sequence[str]) -> Any:
  """Returns `cfg` with dotted `key=value` assignments applied, e.g. `train.steps=100`."""
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(f"override {assignment!r}: expected key=value, e.g. train.steps=100")
    path, text = assignment.split("=", 1)
    cfg = _set(cfg, path.split("."), text, path)
  return cfg


def _set(node: Any, keys: list[str], text: str, path: str) -> Any:
  names = {f.name for f in dataclasses.fields(node)}
  if keys[0] not in names:
    raise ValueError(f"override {path!r}: {type(node).__name__} has no field {keys[0]!r}; "
                     f"fields: {sorted(names)}")
  child = getattr(node, keys[0])
  if len(keys) == 1:
    if dataclasses.is_dataclass(child):
      raise ValueError(f"override {path!r}: is a section, name one of its fields")
    value = _parse(text, typing.get_type_hints(type(node))[keys[0]], path)
  else:
    if not dataclasses.is_dataclass(child):
      raise ValueError(f"override {path!r}: {keys[0]!r} is not a section")
    value = _set(child, keys[1:], text, path)
  return dataclasses.replace(node, **{keys[0]: value})
