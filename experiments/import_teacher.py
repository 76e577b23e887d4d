"""Imports a pretrained PyTorch teacher (`.pth` state_dict) as an orbax checkpoint, without torch.

  python -m experiments.import_teacher teacher_small.pth --size small --out checkpoints/teacher_small

Reads nelson1425/EfficientAD (`teacher_small.pth`, keys `0.weight`, ...) or anomalib
(`pretrained_teacher_small.pth`, keys `conv1.weight`, ...) files, checks every key and shape against PDN-S/M,
and writes {'params', 'meta'} that `efficientad_jax.weights.load_teacher` reads back.
"""

from __future__ import annotations

import argparse
import sys

from efficientad_jax import pth, weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.import_teacher", description=__doc__.split("\n")[0])
  parser.add_argument("path", help="PyTorch .pth holding the teacher's state_dict")
  parser.add_argument("--size", required=True, choices=("small", "medium"), help="PDN size of the teacher")
  parser.add_argument("--out", required=True, help="output folder for the orbax checkpoint")
  parser.add_argument("--force", action="store_true", help="replace a previous teacher checkpoint in --out")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    meta = weights.import_teacher(args.path, args.size, args.out, force=args.force)
  except (pth.PthError, weights.WeightsError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote PDN-{meta['size']} teacher ({meta['channels']} channels, {meta['layout']} layout) "
        f"from {meta['source']} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
