"""Export a trained model's predict function to one file that runs with jax alone (no flax).

  python -m experiments.export --model RUN --out model.eadx [--platforms cpu,cuda]

Then, in any process with jax and numpy:
  from efficientad_jax.export import load_exported
  m = load_exported("model.eadx"); out = m(images)   # images [B, S, S, 3] normalised; out['score'] [B]
Batch size is symbolic; maps come out at the model's image size S (see efficientad_jax/export.py).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="run directory (holding model/) or the model folder")
  p.add_argument("--out", required=True, help="file to write")
  p.add_argument("--platforms", help="comma-separated lowering targets (default: cpu,cuda; e.g. tpu)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from efficientad_jax import export  # after argument parsing: --help stays fast
  platforms = tuple(args.platforms.split(",")) if args.platforms else export.DEFAULT_PLATFORMS
  try:
    path = export.export_model(args.model, args.out, platforms)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  model = export.load_exported(path)
  print(f"wrote {path}: image size {model.image_size}, threshold {model.threshold:.6g}, "
        f"platforms {','.join(model.meta['platforms'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
