"""Teacher distillation on ImageNet (paper §3.1; docs/method.md §8): one run per PDN size.

  python -m experiments.distill_teacher --size small --imagenet /data/imagenet/train \
      --backbone wide_resnet101_2-32ee1156.pth --workdir runs/distill_small
  python -m experiments.train --dataset mvtec_ad ... --set train.teacher_checkpoint=runs/distill_small/teacher

Paper settings: 60,000 steps of batch 16, Adam 1e-4 / wd 1e-5, targets normalised over 10,000 images.
Expected runtime on one H100 -- ESTIMATED from XLA's FLOP counts, never measured: per image the backbone to
layer3 at 512^2 costs 210 GFLOP and the target aggregation 45 GFLOP (39 of them the float32 layer2 pooling
conv), the padded PDN forward+backward at 256^2 110 GFLOP (S) / 370 GFLOP (M); 960,000 images give
3.5e17 / 6.0e17 FLOP, i.e. about 45 min (S) / 65 min (M) at ~200 TFLOP/s effective TF32 (1.2 h / 2 h at
25 % utilisation), if ~12 grain workers (data.num_workers) keep up with JPEG decoding.
`get_config("small,tiny")` is the same pipeline with a tiny random backbone for the tests.
"""

import dataclasses

from efficientad_jax.distillation.config import (
  DistillConfig,
  DistillModelConfig,
  TargetConfig,
)
from experiments.configs.common import parse_size


def get_config(arg: str = "small") -> DistillConfig:
  parts = [a for a in (arg or "small").split(",") if a]
  size = parse_size(next((a for a in parts if a != "tiny"), "small"))
  cfg = DistillConfig(model=DistillModelConfig(size=size))
  if "tiny" in parts:
    # Same code, shrunk: WideResNet [1, 1, 2] blocks with narrow planes, 32^2 student / 64^2 backbone.
    cfg = dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, image_size=32),
      backbone=dataclasses.replace(cfg.backbone, blocks=(1, 1, 2), planes=(4, 8, 16), stem=8, image_size=64),
      target=TargetConfig(layer_dim=256, num_stat_images=4),
      optim=dataclasses.replace(cfg.optim, learning_rate=1e-3),
      train=dataclasses.replace(cfg.train, steps=20, batch_size=2, checkpoint_every=10, log_every=1),
    )
  return cfg
