"""int8 ONNX graph of a saved model for onnxruntime: static QDQ quantization of the networks, with the same float
nodes, calibration images, accuracy measurement and refusal as the int8 OpenVINO IR (`quantize.py`; docs/method.md
§7, §9).

  python -m experiments.export --model RUN --format onnx --int8 --out model_int8.onnx [--max-auroc-drop 0.005]

The quantizer is onnxruntime's own (`onnxruntime.quantization.quantize_static`), not NNCF on the ModelProto.
Both keep the accuracy (synthetic demo model: image AU-ROC 1.000 -> 1.000 with either, AU-PRO@0.3 0.886 -> 0.889
and 0.888), but onnxruntime's x86 int8 kernels want uint8 activations with int8 weights (QLinearConv U8S8), which
onnxruntime's quantizer writes, while NNCF's graph, made for OpenVINO, has int8 activations: in onnxruntime it ran
1.06x the float graph, onnxruntime's 2.08x (BUILD_NOTES.md, "CPU deployment backends").

Settings: QDQ format (a QuantizeLinear/DequantizeLinear pair on each quantized tensor, which the session fuses with
the op into an int8 kernel); weights int8 per output channel; activations uint8 per tensor, ranges the minimum and
maximum over all calibration images (CalibrationMethod.MinMax, as NNCF's MINMAX in the OpenVINO path); the nodes of
`quantize.float_nodes` excluded: the maps after the networks and each network's first convolution.
One difference from the OpenVINO IR: a quantized conv's output is uint8 here (the QDQ pair after it is what lets
onnxruntime run the conv in int8), so the maps, float themselves, read the networks' last features rounded to 8
bits; OpenVINO hands them float. Keeping those three outputs float took most of the speed-up (demo model 1.23x
instead of 2.08x; real-photograph run 1.33x instead of 2.33x) and moved neither image AU-ROC nor AU-PRO@0.3 by
more than 0.0003 on either (the largest score difference there: 0.143, against 0.082, of a 2.64 span).

Metadata: the float graph's metadata_props, plus `weights` and `int8_accuracy` (the figures of
`quantize.accuracy`, JSON), read as the float file's are (`get_modelmeta().custom_metadata_map`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficientad_jax.serving import backends, onnx_graph, quantize

WEIGHTS = "int8 (QDQ: activations uint8 per tensor, weights int8 per channel)"


def resize_with_4d_sizes(proto: Any) -> Any:
  """`proto` (changed in place and returned) with each network's Resize taking 4-D `sizes` (its input's N and C,
  then h, w) instead of the attribute `axes` [2, 3] with 2-D `sizes`: the same resize, in a form onnxruntime's CPU
  session can move to NHWC. It moves a quantized (uint8) Resize there and, with `axes`, fails to load the graph
  ("Number of elements of input 'sizes' (0) does not match the number of axes (2)"), NNCF's graph as well."""
  from onnx import helper

  nodes = []
  for node in proto.graph.node:
    if node.op_type != "Resize" or not node.name.startswith(quantize.NETWORKS):
      nodes.append(node)
      continue
    x, _, _, sizes = node.input
    shape, full = f"{node.name}/nc", f"{node.name}/sizes"
    nodes.append(helper.make_node("Shape", [x], [shape], name=shape, start=0, end=2))
    nodes.append(helper.make_node("Concat", [shape, sizes], [full], name=full, axis=0))
    resize = helper.make_node("Resize", [x, "", "", full], list(node.output), name=node.name)
    resize.attribute.extend(a for a in node.attribute if a.name != "axes")
    nodes.append(resize)
  del proto.graph.node[:]
  proto.graph.node.extend(nodes)
  return proto


def _reader(images: np.ndarray) -> Any:
  """A `CalibrationDataReader` giving the images one at a time, as the graph's input `image` [1, S, S, 3]."""
  from onnxruntime.quantization import CalibrationDataReader

  class Reader(CalibrationDataReader):
    def __init__(self):
      self._images = iter(images)

    def get_next(self) -> dict | None:
      x = next(self._images, None)
      return None if x is None else {"image": np.ascontiguousarray(x[None], np.float32)}

  return Reader()


def quantize_onnx(proto: Any, images: np.ndarray, keep_float: Sequence[str] | None = None) -> Any:
  """The int8 QDQ `onnx.ModelProto` of a float graph (`onnx_graph.to_onnx`; left unchanged), calibrated on
  `images` [N, S, S, 3] (all of them), with the nodes named in `keep_float` (default `float_nodes`) in float32."""
  backends.onnxruntime_module("--int8 --format onnx")
  import onnx
  from onnxruntime import quantization as q

  keep_float = quantize.float_nodes([n.name for n in proto.graph.node]) if keep_float is None else list(keep_float)
  graph = onnx.ModelProto()
  graph.CopyFrom(proto)  # quantize_static rewrites the proto it is given
  root = logging.getLogger()
  level, _ = root.level, root.setLevel(logging.ERROR)  # it advises a pre-processing pass, for fusions ours lacks
  try:
    with tempfile.TemporaryDirectory(prefix="int8-onnx-") as tmp:
      out = pathlib.Path(tmp) / "int8.onnx"
      q.quantize_static(
        resize_with_4d_sizes(graph),
        out,
        _reader(images),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        nodes_to_exclude=keep_float,
        calibrate_method=q.CalibrationMethod.MinMax,
      )
      return onnx.load(out)
  finally:
    root.setLevel(level)


def set_metadata(proto: Any, meta: dict[str, str]) -> None:
  """Adds (or replaces) metadata_props entries, keeping the others."""
  from onnx import helper

  helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **meta})


def export_int8_onnx(
  model_path: str | pathlib.Path,
  out: str | pathlib.Path,
  max_auroc_drop: float = quantize.MAX_AUROC_DROP,
  opset: int = onnx_graph.DEFAULT_OPSET,
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Quantizes, measures and, within the bound, writes the int8 graph `out` (.onnx); returns (path, figures).

  Raises:
    QuantizationError: image AU-ROC drops by more than `max_auroc_drop` (nothing written).
  """
  from efficientad_jax.serving import saved_model

  quantize.check_bound(max_auroc_drop)
  backends.onnxruntime_module("--int8 --format onnx")
  folder = saved_model.model_dir(model_path)
  model = saved_model.load(model_path)
  proto = onnx_graph.to_onnx(
    model, str(folder), opset
  )  # before the images: a model it cannot export is refused at once
  images = quantize.run_images(model, folder)
  keep_float = quantize.float_nodes([n.name for n in proto.graph.node])
  int8 = quantize_onnx(proto, images.train, keep_float)
  float_runner = backends.onnxruntime_runner(model, proto.SerializeToString())
  int8_runner = backends.onnxruntime_runner(model, int8.SerializeToString())
  figures = quantize.measure(float_runner, int8_runner, images, keep_float, max_auroc_drop)
  set_metadata(int8, {"weights": WEIGHTS, "int8_accuracy": json.dumps(figures)})
  return onnx_graph.write_onnx(int8, out), figures
