"""Export a trained model's predict function to one file that runs with jax alone (no flax).

  python -m experiments.export --model RUN --out model.eadx [--platforms cpu,cuda]
  python -m experiments.export --model RUN --format onnx --out model.onnx      # onnxruntime, no JAX

Then, in any process with jax and numpy:
  from efficientad_jax.serving.export import load_exported
  m = load_exported("model.eadx"); out = m(images)   # images [B, S, S, 3] normalised; out['score'] [B]
Batch size is symbolic; maps come out at the model's image size S (see efficientad_jax/export.py).
The ONNX graph takes `image` [N, S, S, 3] and gives `anomaly_map` [N, S, S] and `score` [N]; threshold and
preprocessing are in its metadata_props (see efficientad_jax/onnx_graph.py and the README).
"""

from __future__ import annotations

import argparse
import sys

from experiments import cli


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="run directory (holding model/) or the model folder")
  p.add_argument("--out", required=True, help="file to write")
  p.add_argument(
    "--format",
    choices=("jax", "onnx"),
    default="jax",
    help="jax: a jax.export file (default); onnx: one ONNX graph for onnxruntime",
  )
  p.add_argument("--platforms", help="jax format: comma-separated lowering targets (default: cpu,cuda; e.g. tpu)")
  p.add_argument("--opset", type=int, help="onnx format: ONNX opset (default 18, the least that fits)")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.new_file(args.out, "--out")  # before any work: nothing half-written is left behind
  if args.format == "onnx":
    return export_onnx(args)
  from efficientad_jax.serving import (
    export,  # after argument parsing: --help stays fast
  )

  platforms = tuple(args.platforms.split(",")) if args.platforms else export.DEFAULT_PLATFORMS
  try:
    path = export.export_model(args.model, args.out, platforms)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  model = export.load_exported(path)
  print(
    f"wrote {path}: image size {model.image_size}, threshold {model.threshold:.6g}, "
    f"platforms {','.join(model.meta['platforms'])}"
  )
  return 0


def export_onnx(args: argparse.Namespace) -> int:
  from efficientad_jax.serving import onnx_graph

  if args.platforms:
    raise SystemExit("error: --platforms applies to --format jax only (--platforms): drop it for onnx")
  try:
    path = onnx_graph.export_onnx(args.model, args.out, args.opset or onnx_graph.DEFAULT_OPSET)
  except (FileNotFoundError, ValueError) as e:  # OnnxExportError is a ValueError
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {path} (onnx, opset {args.opset or onnx_graph.DEFAULT_OPSET}): input image [N, S, S, 3], "
    "outputs anomaly_map [N, S, S] and score [N]; threshold and preprocessing in its metadata_props"
  )
  return 0


def command() -> None:
  """The `efficientad-export` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
