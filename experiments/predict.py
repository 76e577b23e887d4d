"""Score images with a trained model: one line per image, maps and overlays with --out.

  python -m experiments.predict --model RUN --images photos/            # a folder
  python -m experiments.predict --model RUN/model --images 'parts/*.png' --out predictions/

Prints `<file>\t<score>\t<anomalous|normal>\t<normalized score>`: anomalous when score > the threshold, the
model's saved one (the 0.99 quantile of its validation normals' scores) unless --threshold gives a number or
--fpr a false-positive rate on those normals; the normalized score is 0 at the validation normals' median and
0.5 at the threshold (efficientad_jax/serving/thresholds.py).
Any image size; grayscale and RGBA are converted. Unreadable or non-image files are reported on stderr
with their name, the others still run, and the exit code is 1 if any failed.
With --out: <out>/<name>.tiff (float32 map at the image's size), <out>/<name>_overlay.png, predictions.csv,
and <out>/report.html: the score distribution with the threshold and every image's overlay, in any browser.
--backend onnxruntime|openvino runs the model's ONNX graph there (pip extra 'deploy'), or the exported graph
given by --graph (e.g. an int8 one); decoding, threshold and files are the same as with jax
(efficientad_jax/serving/backends.py states how closely their maps agree).
"""

from __future__ import annotations

import argparse
import logging
import sys

from experiments import cli

BACKENDS = ("jax", "onnxruntime", "openvino")  # efficientad_jax.serving.backends.BACKENDS, without importing jax


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="run directory (holding model/) or the model folder")
  p.add_argument("--images", required=True, help="a folder, an image file or a glob pattern (quote it)")
  p.add_argument("--out", help="folder for maps (TIFF), overlays (PNG), predictions.csv and report.html")
  p.add_argument("--backend", choices=BACKENDS, default="jax", help="what runs the model (default: jax)")
  p.add_argument("--graph", help="onnxruntime/openvino: an exported .onnx or .xml to run (default: built from --model)")
  rule = p.add_mutually_exclusive_group()
  rule.add_argument("--threshold", type=float, help="decision threshold (default: the model's saved one)")
  rule.add_argument("--fpr", type=float, help="threshold for this false-positive rate on validation normals")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.out:
    cli.writable_folder(args.out, "--out")
  cli.setup_logging(logging.WARNING)
  from efficientad_jax.serving import backends, predict, thresholds  # after argument parsing: --help stays fast

  try:
    paths = predict.list_images(args.images)
    model = predict.load(args.model)
    threshold, rule = thresholds.choose(
      model.threshold, model.validation_scores, threshold=args.threshold, fpr=args.fpr
    )
    runner = backends.make(model, args.backend, args.graph)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"# threshold {threshold:.6g} ({rule}; score > threshold: anomalous)", flush=True)
  show = lambda r: print(
    f"{r.name}\t{r.score:.6g}\t{'anomalous' if r.anomalous else 'normal'}\t{r.normalized_score:.4f}", flush=True
  )
  results, failures = predict.predict_paths(
    model, paths, args.out, on_result=show, threshold=threshold, backend=runner, threshold_rule=rule
  )
  for path, reason in failures:
    print(f"error: {path}: {reason}", file=sys.stderr)
  if failures:
    print(f"{len(failures)} of {len(paths)} files failed; {len(results)} predicted", file=sys.stderr)
  return 1 if failures else 0


def command() -> None:
  """The `efficientad-predict` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
