"""The built-in synthetic dataset (MVTec LOCO layout: structural AND logical anomalies), a CPU demo.

  python -m experiments.train                     # = --dataset synthetic: a few minutes on a 2-core CPU

The teacher is random (no pretrained weights can be assumed on a fresh machine), the penalty is off; the run
still separates both anomaly kinds well (BUILD_NOTES.md, "Measured"). `get_config("tiny")` is the same
pipeline shrunk for the tests (a few seconds).
"""

import dataclasses

from efficientad_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from experiments.configs.common import parse_size


def get_config(arg: str = "small"):
  tiny = "tiny" in arg.split(",")
  size = parse_size(next((a for a in arg.split(",") if a != "tiny"), "small"))
  cfg = Config(
    model=ModelConfig(size=size, image_size=128),
    data=DataConfig(
      dataset="synthetic",
      synthetic_layout="mvtec_loco",
      synthetic_size=128,
      synthetic_train=60,
      synthetic_validation=10,
      synthetic_test=10,
    ),
    train=TrainConfig(steps=300, checkpoint_every=100, log_every=10),
  )
  if tiny:
    cfg = dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, image_size=64),
      data=dataclasses.replace(
        cfg.data, synthetic_size=64, synthetic_train=6, synthetic_validation=3, synthetic_test=2
      ),
      train=dataclasses.replace(cfg.train, steps=4, checkpoint_every=2, log_every=1),
    )
  return cfg
