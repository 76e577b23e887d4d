"""Export a trained model's predict function to one file that runs with jax alone (no flax).

  python -m experiments.export --model RUN --out model.eadx [--platforms cpu,cuda]
  python -m experiments.export --model RUN --format onnx --out model.onnx      # onnxruntime, no JAX
  python -m experiments.export --model RUN --format openvino --out model.xml   # OpenVINO IR (+ model.bin) [--fp16]

Then, in any process with jax and numpy:
  from efficientad_jax.serving.export import load_exported
  m = load_exported("model.eadx"); out = m(images)   # images [B, S, S, 3] normalised; out['score'] [B]
Batch size is symbolic; maps come out at the model's image size S (see efficientad_jax/export.py).
The ONNX graph takes `image` [N, S, S, 3] and gives `anomaly_map` [N, S, S] and `score` [N]; threshold and
preprocessing are in its metadata_props (see efficientad_jax/onnx_graph.py and the README). The OpenVINO IR is
the same graph, its metadata in the IR's rt_info (efficientad_jax/serving/openvino_ir.py); --format onnx and
openvino need the pip extra 'deploy'. `predict --backend onnxruntime|openvino --graph FILE` runs either file.
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
    choices=("jax", "onnx", "openvino"),
    default="jax",
    help="jax: a jax.export file (default); onnx: one ONNX graph for onnxruntime; openvino: an IR (.xml + .bin)",
  )
  p.add_argument("--platforms", help="jax format: comma-separated lowering targets (default: cpu,cuda; e.g. tpu)")
  p.add_argument("--opset", type=int, help="onnx format: ONNX opset (default 18, the least that fits)")
  p.add_argument("--fp16", action="store_true", help="openvino format: float16 weights (computed in float32)")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.new_file(args.out, "--out")  # before any work: nothing half-written is left behind
  if args.fp16 and args.format != "openvino":
    raise SystemExit("error: --fp16 applies to --format openvino only (--fp16): add --format openvino or drop it")
  if args.format == "onnx":
    return export_onnx(args)
  if args.format == "openvino":
    return export_openvino(args)
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


def export_openvino(args: argparse.Namespace) -> int:
  from efficientad_jax.serving import openvino_ir

  if args.platforms or args.opset:
    raise SystemExit("error: --platforms and --opset apply to --format jax and onnx (--format): drop them")
  if not args.out.endswith(".xml"):
    raise SystemExit(f"error: {args.out}: an OpenVINO IR is written as NAME.xml, with NAME.bin beside it (--out)")
  cli.new_file(args.out[: -len(".xml")] + ".bin", "--out")
  try:
    path = openvino_ir.export_openvino(args.model, args.out, args.fp16)
  except (FileNotFoundError, ValueError) as e:  # BackendError and OnnxExportError are ValueErrors
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {path} and {path.with_suffix('.bin').name} (openvino, {'float16' if args.fp16 else 'float32'} weights): "
    "input image [N, S, S, 3], outputs anomaly_map [N, S, S], score [N], map_combined; metadata in its rt_info"
  )
  return 0


def command() -> None:
  """The `efficientad-export` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
