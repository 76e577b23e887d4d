"""Export a trained model's predict function to one file that runs with jax alone (no flax).

  python -m experiments.export --model RUN --out model.eadx [--platforms cpu,cuda]
  python -m experiments.export --model RUN --format onnx --out model.onnx      # onnxruntime, no JAX
  python -m experiments.export --model RUN --format openvino --out model.xml   # OpenVINO IR (+ model.bin) [--fp16]
  python -m experiments.export --model RUN --int8 --out model_int8.xml         # int8 IR, measured; [--max-auroc-drop]
  python -m experiments.export --model RUN --format onnx --int8 --out model_int8.onnx   # int8 QDQ for onnxruntime

Then, in any process with jax and numpy:
  from efficientad_jax.serving.export import load_exported
  m = load_exported("model.eadx"); out = m(images)   # images [B, H, W, 3] normalised; out['score'] [B]
Batch size is symbolic; maps come out at the model's image size H x W (see efficientad_jax/export.py).
The ONNX graph takes `image` [N, H, W, 3] and gives `anomaly_map` [N, H, W] and `score` [N]; threshold and
preprocessing are in its metadata_props (see efficientad_jax/onnx_graph.py and the README). The OpenVINO IR is
the same graph, its metadata in the IR's rt_info (efficientad_jax/serving/openvino_ir.py); --format onnx and
openvino need the pip extra 'deploy'. `predict --backend onnxruntime|openvino --graph FILE` runs either file.
--int8 (OpenVINO IR by NNCF, or with --format onnx a QDQ graph by onnxruntime's quantizer) calibrates on the run's
normal training images, keeps the maps in float, measures int8 against float on the run's test images (image
AU-ROC, AU-PRO@0.3, score difference: printed and in the file's metadata) and refuses when the image AU-ROC drops
by more than --max-auroc-drop (efficientad_jax/serving/quantize.py, onnx_int8.py).
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
    help="jax: a jax.export file (default); onnx: one ONNX graph for onnxruntime; openvino: an IR (.xml + .bin), "
    "the default with --int8",
  )
  p.add_argument("--platforms", help="jax format: comma-separated lowering targets (default: cpu,cuda; e.g. tpu)")
  p.add_argument("--opset", type=int, help="onnx format: ONNX opset (default 18, the least that fits)")
  p.add_argument("--fp16", action="store_true", help="openvino format: float16 weights (computed in float32)")
  p.add_argument(
    "--int8", action="store_true", help="openvino or onnx format: int8 networks, calibrated on the run's normals"
  )
  p.add_argument(
    "--max-auroc-drop",
    type=auroc_drop,
    default=0.005,
    help="--int8: refuse when int8's image AU-ROC on the run's test images is lower than float's by more (0.005)",
  )
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.new_file(args.out, "--out")  # before any work: nothing half-written is left behind
  args.format = args.format or ("openvino" if args.int8 else "jax")
  if args.fp16 and args.format != "openvino":
    raise SystemExit("error: --fp16 applies to --format openvino only (--fp16): add --format openvino or drop it")
  if args.int8 and args.format not in ("onnx", "openvino"):
    raise SystemExit(
      f"error: --int8 applies to --format openvino or onnx, not {args.format} (--int8): choose one or drop --int8"
    )
  if args.fp16 and args.int8:
    raise SystemExit("error: --fp16 and --int8 are two weight formats (--fp16, --int8): choose one")
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
  if args.int8:
    return export_int8_onnx(args)
  try:
    path = onnx_graph.export_onnx(args.model, args.out, args.opset or onnx_graph.DEFAULT_OPSET)
  except (FileNotFoundError, ValueError) as e:  # OnnxExportError is a ValueError
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {path} (onnx, opset {args.opset or onnx_graph.DEFAULT_OPSET}): input image [N, H, W, 3], "
    "outputs anomaly_map [N, H, W] and score [N]; threshold and preprocessing in its metadata_props"
  )
  return 0


def export_openvino(args: argparse.Namespace) -> int:
  from efficientad_jax.serving import openvino_ir

  if args.platforms or args.opset:
    raise SystemExit("error: --platforms and --opset apply to --format jax and onnx (--format): drop them")
  if not args.out.endswith(".xml"):
    raise SystemExit(f"error: {args.out}: an OpenVINO IR is written as NAME.xml, with NAME.bin beside it (--out)")
  cli.new_file(args.out[: -len(".xml")] + ".bin", "--out")
  if args.int8:
    return export_int8(args)
  try:
    path = openvino_ir.export_openvino(args.model, args.out, args.fp16)
  except (FileNotFoundError, ValueError) as e:  # BackendError and OnnxExportError are ValueErrors
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {path} and {path.with_suffix('.bin').name} (openvino, {'float16' if args.fp16 else 'float32'} weights): "
    "input image [N, H, W, 3], outputs anomaly_map [N, H, W], score [N], map_combined; metadata in its rt_info"
  )
  return 0


def export_int8(args: argparse.Namespace) -> int:
  from efficientad_jax.serving import quantize

  try:
    path, f = quantize.export_int8(args.model, args.out, args.max_auroc_drop)
  except (FileNotFoundError, ValueError) as e:  # QuantizationError, BackendError, DataError are ValueErrors
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {path} and {path.with_suffix('.bin').name} (openvino, {int8_summary(f)}; in its rt_info 'int8_accuracy'"
  )
  return 0


def export_int8_onnx(args: argparse.Namespace) -> int:
  from efficientad_jax.serving import onnx_graph, onnx_int8

  try:
    path, f = onnx_int8.export_int8_onnx(
      args.model, args.out, args.max_auroc_drop, args.opset or onnx_graph.DEFAULT_OPSET
    )
  except (FileNotFoundError, ValueError) as e:  # QuantizationError, BackendError, OnnxExportError, DataError
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {path} (onnx, QDQ, {int8_summary(f)}; in its metadata_props 'int8_accuracy'")
  return 0


def int8_summary(f: dict) -> str:
  """What the int8 model is and how it measured (`quantize.accuracy` figures), for the one line printed."""
  from efficientad_jax.serving.quantize import PRO_LIMIT as pro

  pro_text = (
    f", AU-PRO@{pro} {f[f'au_pro_{pro}_int8']:.4f} (float {f[f'au_pro_{pro}_float']:.4f})"
    if f[f"au_pro_{pro}_float"] is not None
    else ""
  )
  return (
    f"int8 networks, float maps; calibrated on {f['calibration_images']} normal training images). On "
    f"{f['test_images']} test images: image AU-ROC {f['image_auroc_int8']:.4f} (float {f['image_auroc_float']:.4f})"
    f"{pro_text}, largest score difference {f['max_score_difference']:.4g} (float scores span "
    f"{f['float_score_range']:.4g})"
  )


def auroc_drop(text: str) -> float:
  """argparse type of --max-auroc-drop: a number >= 0 (a bad value is a usage error, exit status 2)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"{text}: a drop in image AU-ROC is a number >= 0")
  return value


def command() -> None:
  """The `efficientad-export` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
