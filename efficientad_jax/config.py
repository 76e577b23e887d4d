"""Typed configuration tree. Every constant of the method lives here (docs/method.md §2-§7).

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


class ConfigError(ValueError):
  """A config value the run cannot use (a bad `--set`, a field out of range): a usage error (exit 2)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Networks (paper §3.1, §3.3; docs/method.md §2-§3)."""

  size: str = "small"  # "small" | "medium": PDN-S or PDN-M
  teacher_channels: int = 384  # student outputs 2x this: [:C] predicts the teacher, [C:] the autoencoder
  image_size: int = 256  # networks see image_size x image_size
  dtype: str = "float32"  # compute dtype; params, statistics and maps stay float32
  ae_dropout: float = 0.2  # decoder dropout rate (training only)
  # Conv backward pass (models/conv.py): "auto" = "mixed" on CPU (matmul weight gradients where XLA:CPU's
  # own are slow), XLA's elsewhere; "xla" | "im2col" | "shifted" | "mixed" force one. Same parameters and
  # forward numbers.
  conv_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Training objective (paper §3.2-§3.3; docs/method.md §5)."""

  hard_quantile: float = 0.999  # L_hard averages the squared errors >= this quantile


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam with coupled L2 weight decay, step decay of the learning rate (docs/method.md §6)."""

  learning_rate: float = 1e-4
  weight_decay: float = 1e-5  # coupled L2 (PyTorch Adam(weight_decay=)), not AdamW
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  decay_at_fraction: float = 0.95  # lr x decay_factor from step decay_at_fraction * steps
  decay_factor: float = 0.1


@dataclasses.dataclass(frozen=True)
class MapConfig:
  """Map normalisation and post-processing (paper §3.4; docs/method.md §7)."""

  q_start: float = 0.9  # quantile of validation map values mapped to 0
  q_end: float = 0.995  # quantile of validation map values mapped to `scale`
  scale: float = 0.1
  st_weight: float = 0.5  # combined = st_weight * st' + ae_weight * ae'
  ae_weight: float = 0.5
  pad: int = 4  # zero padding per side of the 56x56 combined map before resizing
  threshold_quantile: float = 0.99  # decision threshold: this quantile of validation image scores


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Datasets and preprocessing (docs/method.md §4)."""

  dataset: str = "synthetic"  # synthetic | mvtec_ad | mvtec_loco | visa | folder
  root: str = ""  # dataset folder (extracted archive); synthetic: where to generate it
  download: bool = False  # root missing: download the published archive there first (efficientad_jax/download.py)
  category: str = ""  # MVTec/VisA category; synthetic: its object name
  penalty: str = ""  # "" (off), an image folder, or "tfds:imagenette" / "tfds:imagenet2012"
  validation_fraction: float = 0.1  # MVTec AD, VisA, folder: n - int((1 - f) * n) of n train images held out (seeded)
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
  """The training loop (docs/method.md §5-§6)."""

  steps: int = 70_000
  seed: int = 0
  # Global batch: normal images per step (and as many penalty images); 1 as in the paper. It is split over
  # the largest number of devices that divides it (train_step.data_parallel_devices).
  batch_size: int = 1
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
    raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
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
    raise ConfigError(f"{where}: expected a boolean, got {text!r}")
  origin = typing.get_origin(hint)
  if origin is tuple:
    item = typing.get_args(hint)[0]
    return tuple(_parse(t, item, where) for t in text.split(","))
  try:
    return hint(text)
  except ValueError:
    raise ConfigError(f"{where}: expected {hint.__name__}, got {text!r}") from None


def override(cfg: Any, assignments: Sequence[str]) -> Any:
  """Returns `cfg` with dotted `key=value` assignments applied, e.g. `train.steps=100`."""
  for assignment in assignments:
    if "=" not in assignment:
      raise ConfigError(f"override {assignment!r}: expected key=value, e.g. train.steps=100")
    path, text = assignment.split("=", 1)
    cfg = _set(cfg, path.split("."), text, path)
  return cfg


def _set(node: Any, keys: list[str], text: str, path: str) -> Any:
  names = {f.name for f in dataclasses.fields(node)}
  if keys[0] not in names:
    raise ConfigError(f"override {path!r}: {type(node).__name__} has no field {keys[0]!r}; "
                     f"fields: {sorted(names)}")
  child = getattr(node, keys[0])
  if len(keys) == 1:
    if dataclasses.is_dataclass(child):
      raise ConfigError(f"override {path!r}: is a section, name one of its fields")
    value = _parse(text, typing.get_type_hints(type(node))[keys[0]], path)
  else:
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"override {path!r}: {keys[0]!r} is not a section")
    value = _set(child, keys[1:], text, path)
  return dataclasses.replace(node, **{keys[0]: value})


# --- Range checks, before any work (README "When something goes wrong").

MODEL_SIZES = ("small", "medium")
DTYPES = ("float32", "bfloat16", "float16")
CONV_IMPLS = ("auto", "xla", "im2col", "shifted", "mixed")  # models/conv.py IMPLS
DATASETS = ("synthetic", "mvtec_ad", "mvtec_loco", "visa", "folder")  # data/api.py DATASETS


def _rules(cfg: Config) -> list[tuple[str, bool, str]]:
  """(field, holds, requirement) for every range rule of a `Config`."""
  m, o, q, d, t = cfg.model, cfg.optim, cfg.maps, cfg.data, cfg.train
  frac = lambda v: 0 < v < 1  # noqa: E731
  unit = lambda v: 0 <= v <= 1  # noqa: E731
  return [
      ("model.size", m.size in MODEL_SIZES, f"one of {MODEL_SIZES}"),
      ("model.teacher_channels", m.teacher_channels >= 1, ">= 1"),
      ("model.image_size", m.image_size >= 40, ">= 40 (smaller inputs leave the PDN an empty map)"),
      ("model.dtype", m.dtype in DTYPES, f"one of {DTYPES}"),
      ("model.ae_dropout", 0 <= m.ae_dropout < 1, "in [0, 1)"),
      ("model.conv_impl", m.conv_impl in CONV_IMPLS, f"one of {CONV_IMPLS}"),
      ("loss.hard_quantile", unit(cfg.loss.hard_quantile), "in [0, 1]"),
      ("optim.learning_rate", o.learning_rate > 0, "> 0"),
      ("optim.weight_decay", o.weight_decay >= 0, ">= 0"),
      ("optim.b1", 0 <= o.b1 < 1, "in [0, 1)"),
      ("optim.b2", 0 <= o.b2 < 1, "in [0, 1)"),
      ("optim.eps", o.eps > 0, "> 0"),
      ("optim.decay_at_fraction", unit(o.decay_at_fraction), "in [0, 1]"),
      ("optim.decay_factor", o.decay_factor > 0, "> 0"),
      ("maps.q_start", unit(q.q_start), "in [0, 1]"),
      ("maps.q_end", unit(q.q_end) and q.q_end > q.q_start, "in [0, 1] and > maps.q_start"),
      ("maps.scale", q.scale > 0, "> 0"),
      ("maps.pad", q.pad >= 0, ">= 0"),
      ("maps.threshold_quantile", unit(q.threshold_quantile), "in [0, 1]"),
      ("data.dataset", d.dataset in DATASETS, f"one of {DATASETS}"),
      ("data.validation_fraction", frac(d.validation_fraction),
       "in (0, 1): calibration needs held-out validation images"),
      ("data.jitter_low", 0 <= d.jitter_low <= d.jitter_high, "in [0, data.jitter_high]"),
      ("data.std", all(s > 0 for s in d.std) and len(d.std) == 3, "three values > 0"),
      ("data.mean", len(d.mean) == 3, "three values"),
      ("data.penalty_resize", d.penalty_resize >= m.image_size, ">= model.image_size"),
      ("data.penalty_grayscale_prob", unit(d.penalty_grayscale_prob), "in [0, 1]"),
      ("data.synthetic_size", d.synthetic_size >= 16, ">= 16"),
      ("data.synthetic_train", d.synthetic_train >= 2, ">= 2 (training and validation images)"),
      ("data.synthetic_layout", d.synthetic_layout in ("mvtec_ad", "mvtec_loco"), "mvtec_ad or mvtec_loco"),
      ("data.synthetic_test", d.synthetic_test >= 1, ">= 1"),
      ("data.synthetic_validation", d.synthetic_validation >= 1, ">= 1"),
      ("data.source", d.source in ("files", "tfds"), "files or tfds"),
      ("data.num_workers", d.num_workers >= 0, ">= 0"),
      ("data.prefetch", d.prefetch >= 0, ">= 0"),
      ("train.steps", t.steps >= 1, ">= 1"),
      ("train.batch_size", t.batch_size >= 1, ">= 1"),
      ("train.checkpoint_every", t.checkpoint_every >= 1, ">= 1"),
      ("train.max_to_keep", t.max_to_keep >= 1, ">= 1"),
      ("train.log_every", t.log_every >= 1, ">= 1"),
  ]


def validate(cfg: Config) -> Config:
  """Returns `cfg` if every field is in range; else raises ConfigError naming the first bad field."""
  for field, holds, requirement in _rules(cfg):
    if not holds:
      section, name = field.split(".")
      value = getattr(getattr(cfg, section), name)
      raise ConfigError(f"{field} = {value!r} is out of range (--set {field}=...): it must be {requirement}")
  return cfg


# Fields a resumed run may change (docs: BUILD_NOTES.md "Resuming with other settings"): none changes the
# networks, the checkpointed state's shapes, or which images the data stream draws in which order.
RESUMABLE = frozenset({
    "optim.learning_rate",  # the divergence advice; Adam's moments do not depend on it
    "train.steps",  # extend or shorten a run (the decay point, decay_at_fraction * steps, moves with it)
    "train.log_every", "train.checkpoint_every", "train.max_to_keep",
    "data.root", "data.download", "data.tfds_data_dir", "data.num_workers", "data.prefetch",
    "model.conv_impl",  # same parameters and forward numbers, another backward implementation
})


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'section.field': value} of a config (any nesting of dataclasses or dicts)."""
  items = dataclasses.asdict(tree).items() if dataclasses.is_dataclass(tree) else tree.items()
  out = {}
  for key, value in items:
    if isinstance(value, dict):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def changed_fields(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
  """{'section.field': (old, new)} for the fields whose values differ."""
  a, b = flat_fields(old), flat_fields(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclasses.dataclass(frozen=True)
class AstConfig:
  """EfficientAD-AST (method 'efficientad_ast', package `efficientad_jax.ast`): EfficientNet-B5 features +
  2-D positional encoding, a conditional normalizing-flow teacher, a residual conv student and a
  feature-space autoencoder. Published: MVTec AD image/pixel AU-ROC 96.98 / 94.00, LOCO 73.3 / 73.5."""

  data: DataConfig = DataConfig()
  image_size: int = 768  # network input side; features are image_size / 32
  dtype: str = "float32"  # compute dtype of the trained nets; maps and losses stay float32
  # Backbone: torchvision EfficientNet (B5: width 1.6, depth 2.2, BN eps 1e-3) cut after features.<stages>.
  backbone_weights: str = ""  # torchvision efficientnet_b5 state_dict .pth; "" = random weights (demo only)
  backbone_width: float = 1.6
  backbone_depth: float = 2.2
  backbone_stages: int = 6  # features.0..6 -> 304 channels at stride 32
  backbone_bn_eps: float = 1e-3
  pos_channels: int = 32  # 2-D sinusoidal positional encoding: half for x, half for y
  # Teacher: conditional affine-coupling flow.
  flow_blocks: int = 4
  flow_hidden: int = 1024
  flow_kernel: int = 3
  flow_clamp: float = 3.0  # log-scales soft-clamped to (-clamp, clamp)
  flow_seed: int = 0  # the fixed channel permutations
  flow_epochs: int = 240
  # Student (2C outputs: [:C] predicts the teacher, [C:] the autoencoder) and autoencoder.
  student_hidden: int = 1024
  student_blocks: int = 4
  student_kernel: int = 3
  leaky_slope: float = 0.01  # PyTorch LeakyReLU default
  bn_momentum: float = 0.9  # Flax convention (= PyTorch momentum 0.1)
  bn_eps: float = 1e-5
  ae_channels: int = 64
  ae_dropout: float = 0.2
  student_epochs: int = 100  # maximum; early stopping on validation-normal loss
  patience_fraction: float = 0.1  # patience = max(1, int(fraction * student_epochs)) epochs
  # Optimisation (both stages): Adam with coupled L2 weight decay, constant learning rate.
  learning_rate: float = 2e-4
  weight_decay: float = 1e-5
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  batch_size: int = 8  # global batch, divisible by the device count
  # Maps: combined = st_weight * map_st + ae_weight * map_ae, no normalisation, no padding; score = max.
  st_weight: float = 0.5
  ae_weight: float = 0.5
  threshold_quantile: float = 0.99  # decision threshold: this quantile of validation image scores
  seed: int = 0
  checkpoint_every: int = 10  # epochs
  max_to_keep: int = 2


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Teacher distillation on ImageNet (paper section 3.1; docs/method.md §8).

  The student of this stage is the padded PDN at `image_size` (output image_size / 4); the target comes from
  WideResNet layer2 / layer3 at `backbone_size`, so layer2's grid (backbone_size / 8) must equal it.
  """

  size: str = "small"  # PDN-S or PDN-M being distilled
  channels: int = 384  # teacher output channels = target channels
  imagenet: str = ""  # image folder (searched recursively) or "tfds:imagenet2012"
  tfds_data_dir: str = ""
  backbone_weights: str = ""  # torchvision wide_resnet101_2 state_dict .pth
  backbone_blocks: tuple[int, int, int] = (3, 4, 23)  # bottlenecks in layer1..3 (tests shrink these)
  backbone_planes: tuple[int, int, int] = (64, 128, 256)
  backbone_width: int = 2  # "wide": bottleneck width = planes * 2
  backbone_stem: int = 64
  layer_dim: int = 1024  # each layer's unfolded 3x3 patch vector is pooled to this
  image_size: int = 256  # student input
  backbone_size: int = 512  # backbone input (the same image)
  grayscale_prob: float = 0.1  # RandomGrayscale before both networks
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  steps: int = 60_000
  batch_size: int = 16  # global batch, sharded over all devices
  learning_rate: float = 1e-4  # Adam, no schedule
  weight_decay: float = 1e-5  # coupled L2 (PyTorch Adam(weight_decay=))
  num_stat_images: int = 10_000  # target channel statistics (rounded down to whole batches)
  seed: int = 0
  checkpoint_every: int = 5_000
  max_to_keep: int = 2
  log_every: int = 100
  num_workers: int = 0  # grain worker processes
  prefetch: int = 2
