"""Evaluate a trained run on its test set: metrics, maps in the official layout, curves, a report to look at.

  python -m experiments.evaluate --workdir runs/synthetic_default_small_seed0
  python -m experiments.evaluate --workdir RUN --set data.root=/data/mvtec_ad   # another copy of the data
  python -m experiments.evaluate --workdir RUN --fpr 0.01          # decisions at 1 % false positives on validation
  python -m experiments.evaluate --workdir RUN --threshold f1      # ... at the test set's F1-optimal point

Writes RUN/eval/{report.html, metrics.json, results.md, scores.csv, anomaly_maps/, roc.png, pr.png} and prints
the tables. report.html opens in any browser, from the file system: metrics, curves, the score distribution with
the threshold, and every test image's overlay, false positives and false negatives first.
Decisions are taken at the model's saved threshold (the 0.99 quantile of its validation normals' scores) unless
--threshold or --fpr choose another; 'f1' uses the test labels and is reported as such.
"""

from __future__ import annotations

import argparse
import sys

from efficientad_jax import config as config_lib
from experiments import cli


def threshold_arg(text: str) -> float | str:
  if text == "f1":
    return text
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'f1'") from None


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
  rule = p.add_mutually_exclusive_group()
  rule.add_argument(
    "--threshold",
    type=threshold_arg,
    help="decision threshold: a number, or 'f1' for the test set's F1-optimal point (default: the saved one)",
  )
  rule.add_argument("--fpr", type=float, help="threshold for this false-positive rate on validation normals")
  p.add_argument("--no-report", action="store_true", help="skip report.html and its pictures (faster)")
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
  from efficientad_jax.serving import predict, thresholds  # after argument parsing: --help stays fast

  cfg = None
  if args.set:
    try:
      cfg = config_lib.override(predict.load(args.workdir).cfg, args.set)
    except FileNotFoundError as e:
      raise SystemExit(f"error: {e}") from None
  try:
    metrics = evaluate.evaluate(
      args.workdir,
      cfg=cfg,
      out_dir=args.out,
      threshold=args.threshold,
      fpr=args.fpr,
      report=not args.no_report,
      batch_size=args.batch_size,
    )
  except thresholds.ThresholdError as e:
    raise SystemExit(f"error: {e}") from None
  print(evaluate.results_table(metrics))
  return 0


def command() -> None:
  """The `efficientad-evaluate` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
