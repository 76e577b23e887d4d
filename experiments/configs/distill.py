"""Teacher distillation on ImageNet (SPEC section 5): one run per PDN size.

  python -m experiments.distill_teacher --size small --imagenet /data/imagenet/train \
      --backbone wide_resnet101_2-32ee1156.pth --workdir runs/distill_small
  python -m experiments.train --dataset mvtec_ad ... --set train.teacher_checkpoint=runs/distill_small/teacher

Paper settings: 60,000 steps of batch 16, Adam 1e-4 / wd 1e-5, targets normalised over 10,000 images.
Expected runtime: BUILD_NOTES.md, "Teacher distillation" (estimated from FLOPs; not yet measured on a GPU).
`get_config("small,tiny")` is the same pipeline with a tiny random backbone for the tests.
"""

import dataclasses

from efficientad_jax.config import DistillConfig
from experiments.configs.common import parse_size


@dataclasses.dataclass(frozen=True)
class DistillExperiment:
  """Top level of `--set distill.<field>=...` overrides."""

  distill: DistillConfig = DistillConfig()


def get_config(arg: str = "small") -> DistillExperiment:
  parts = [a for a in (arg or "small").split(",") if a]
  size = parse_size(next((a for a in parts if a != "tiny"), "small"))
  cfg = DistillConfig(size=size)
  if "tiny" in parts:
    # Same code, shrunk: WideResNet [1, 1, 2] blocks with narrow planes, 64^2 student / 128^2 backbone.
    cfg = dataclasses.replace(
        cfg, backbone_blocks=(1, 1, 2), backbone_planes=(4, 8, 16), backbone_stem=8, layer_dim=256,
        image_size=64, backbone_size=128, steps=20, batch_size=4, learning_rate=1e-3, num_stat_images=8,
        checkpoint_every=10, log_every=1)
  return DistillExperiment(distill=cfg)
