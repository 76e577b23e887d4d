"""EfficientAD-AST on the built-in synthetic dataset (method 'efficientad_ast'): a pipeline demo, no claim.

  python -m experiments.train --method efficientad_ast                      # random backbone; slow on a CPU
  python -m experiments.train --method efficientad_ast --size small,tiny    # the tests' shrunk nets: seconds

The backbone is random (no EfficientNet-B5 weights can be assumed), so the maps show the mechanics only.
`get_config("tiny")` shrinks every network and epoch count as tests/test_ast_training.py does.
"""

import dataclasses

from efficientad_jax.config import DataConfig
from efficientad_jax.efficientad_ast.config import (
  AstConfig,
  AstModelConfig,
  EfficientNetConfig,
  FlowConfig,
)


def get_config(arg: str = ""):
  data = DataConfig(
    dataset="synthetic",
    synthetic_layout="mvtec_ad",
    synthetic_size=128,
    synthetic_train=40,
    synthetic_test=8,
    validation_fraction=0.2,
  )
  cfg = AstConfig(model=AstModelConfig(image_size=256), data=data)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, flow_epochs=8, student_epochs=8))
  if "tiny" in arg.split(","):
    cfg = dataclasses.replace(
      cfg,
      data=dataclasses.replace(data, synthetic_size=64, synthetic_train=4, synthetic_test=2, validation_fraction=0.25),
      model=AstModelConfig(image_size=16, pos_channels=8, student_hidden=16, student_blocks=1, ae_channels=8),
      backbone=EfficientNetConfig(width=0.25, depth=0.25, stages=2),
      flow=FlowConfig(blocks=2, hidden=16),
      train=dataclasses.replace(cfg.train, flow_epochs=2, student_epochs=3, batch_size=2, checkpoint_every=1),
    )
  return cfg
