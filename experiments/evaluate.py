"""Evaluate a trained run on its test set: metrics, maps in the official layout, curves, overlays.

  python -m experiments.evaluate --workdir runs/synthetic_default_small_seed0
  python -m experiments.evaluate --workdir RUN --set data.root=/data/mvtec_ad   # another copy of the data

Writes RUN/eval/{metrics.json, results.md, anomaly_maps/, roc.png, pr.png, overlays/} and prints the table.
"""

from __future__ import annotations

import argparse
import sys

from efficientad_jax import config as config_lib
from experiments import cli


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory (holding model/) or a model folder")
  p.add_argument("--out", help="output folder (default: RUN/eval)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override the saved config's data section, e.g. --set data.root=/data (repeatable)",
  )
  p.add_argument("--overlays", type=int, default=8, help="number of overlay pictures")
  p.add_argument("--batch-size", type=cli.positive_int, default=8, help="images per predict call")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  for assignment in args.set:
    if not assignment.startswith("data."):
      raise config_lib.ConfigError(
        f"--set {assignment}: evaluate may override only data.* fields (the networks, maps and threshold "
        "come from the saved model): drop it, or train a model with that setting"
      )
  cli.setup_logging()
  from efficientad_jax.evaluation import evaluate
  from efficientad_jax.serving import (
    predict,  # after argument parsing: --help stays fast
  )

  cfg = None
  if args.set:
    try:
      cfg = config_lib.override(predict.load(args.workdir).cfg, args.set)
    except FileNotFoundError as e:
      raise SystemExit(f"error: {e}") from None
  metrics = evaluate.evaluate(
    args.workdir, cfg=cfg, out_dir=args.out, max_overlays=args.overlays, batch_size=args.batch_size
  )
  print(evaluate.results_table(metrics))
  return 0


def command() -> None:
  """The `efficientad-evaluate` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
