"""Distils a PDN teacher from WideResNet-101-2 features on ImageNet (paper §3.1; docs/method.md §8).

  python -m experiments.distill_teacher --size small --imagenet /data/imagenet/train \
      --backbone wide_resnet101_2-32ee1156.pth --workdir runs/distill_small [--set train.steps=1000]

--imagenet: an image folder (searched recursively) or tfds:imagenet2012. --backbone: torchvision's
wide_resnet101_2 state_dict (read without torch). Writes RUN/teacher, which training takes with
--set train.teacher_checkpoint=RUN/teacher. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from efficientad_jax import config as config_lib
from experiments import cli, configs


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m experiments.distill_teacher",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--size", default="small", help="S/small or M/medium (tests: 'small,tiny')")
  p.add_argument("--imagenet", required=True, help="ImageNet train folder or tfds:imagenet2012")
  p.add_argument("--backbone", required=True, help="torchvision wide_resnet101_2 state_dict .pth")
  p.add_argument("--workdir", required=True, help="run directory (checkpoints, teacher)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config field, e.g. --set train.steps=1000 (repeatable)",
  )
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.setup_logging()
  cli.init_distributed(args.distributed)
  cfg = config_lib.override(configs.get("distill", "imagenet", args.size), args.set)
  cfg = config_lib.validate(
    dataclasses.replace(
      cfg,
      data=dataclasses.replace(cfg.data, imagenet=args.imagenet),
      backbone=dataclasses.replace(cfg.backbone, weights=args.backbone),
    )
  )
  from efficientad_jax.distillation import trainer

  teacher, _ = trainer.distill(cfg, args.workdir)
  print(f"teacher: {teacher}")
  return 0


def command() -> None:
  """The `efficientad-distill-teacher` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
