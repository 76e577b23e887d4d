"""Shared pieces of the experiment configs."""

from efficientad_jax.config import (
  Config,
  ConfigError,
  DataConfig,
  ModelConfig,
  TrainConfig,
)

SIZES = {"s": "small", "small": "small", "m": "medium", "medium": "medium"}


def parse_size(arg: str) -> str:
  """'S' / 'small' / 'M' / 'medium' -> 'small' | 'medium'."""
  key = (arg or "small").strip().lower()
  if key not in SIZES:
    tiny = "tiny" in key.split(",")
    raise ConfigError(
      f"model size {arg!r} (--size): use S/small or M/medium"
      + ("; the tiny variants ('small,tiny') exist for --dataset synthetic only" if tiny else "")
    )
  return SIZES[key]


def paper(dataset: str, size_arg: str, root: str, category: str) -> Config:
  """The paper's settings: 256x256, 70,000 steps, global batch 1, ImageNet penalty (docs/method.md §4-§6).

  The penalty folder is a placeholder: point data.penalty at ImageNet/Imagenette train images (any image
  folder), or at `tfds:imagenette` once that TFDS dataset is built.
  """
  return Config(
    model=ModelConfig(size=parse_size(size_arg)),
    data=DataConfig(dataset=dataset, root=root, category=category, penalty="data/imagenet/train"),
    train=TrainConfig(steps=70_000, checkpoint_every=5_000, log_every=100),
  )
