"""Shared pieces of the experiment configs."""

from efficientad_jax.config import Config, DataConfig, ModelConfig, TrainConfig

SIZES = {"s": "small", "small": "small", "m": "medium", "medium": "medium"}


def parse_size(arg: str) -> str:
  """'S' / 'small' / 'M' / 'medium' -> 'small' | 'medium'."""
  key = (arg or "small").strip().lower()
  if key not in SIZES:
    raise ValueError(f"model size must be S/small or M/medium, got {arg!r}")
  return SIZES[key]


def paper(dataset: str, size_arg: str, root: str, category: str) -> Config:
  """The paper's settings: 256x256, 70,000 steps, batch 1 per device, ImageNet penalty (SPEC 2-3).

  The penalty folder is a placeholder: point data.penalty at ImageNet/Imagenette train images (any image
  folder), or at `tfds:imagenette` once that TFDS dataset is built.
  """
  return Config(
      model=ModelConfig(size=parse_size(size_arg)),
      data=DataConfig(dataset=dataset, root=root, category=category, penalty="data/imagenet/train"),
      train=TrainConfig(steps=70_000, checkpoint_every=5_000, log_every=100),
  )
