"""The whole predict path of a saved EfficientAD model as one ONNX graph (docs/method.md §2-§3 and §7).

  python -m experiments.export --model RUN --format onnx --out model.onnx

Input  `image`        float32 [N, H, W, 3], NHWC, H x W the model's image size (metadata image_height,
                      image_width), normalised: (rgb / 255 - mean) / std after a bilinear (antialiased, PIL)
                      resize to H x W; all of it in the model's metadata_props.
Output `anomaly_map`  float32 [N, H, W]; `score` float32 [N] = max of the map; anomalous if score > threshold;
       `map_combined` float32 [N, h, w], the map before padding and resize, from which `serving.backends` makes
                      the map at an image's own size exactly as the jax path does.

The graph is `inference.predict` written out op by op from the Flax parameter tree (no converter):
teacher, student and autoencoder (Conv with symmetric pads, Relu, AveragePool count_include_pad=1, Resize
linear / half_pixel / antialias 0), teacher normalisation (T - mean) / std, the maps mean_c (T_hat - S[:C])^2
and mean_c (A - S[C:])^2, quantile normalisation scale * (m - q_a) / (q_b - q_a), the weighted sum, zero
padding and the bilinear resize to H x W. Every constant comes from the saved model (its MapConfig, teacher
statistics and quantiles). As in `export.py`, the map is produced at H x W: resize it to an image's own size.
Only the PDN method ('efficientad') is exported; the AST variant (efficientad_jax/ast) is refused in one
line (it exports with the jax.export path, `export.py`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficientad_jax import tiles
from efficientad_jax.data import preprocess
from efficientad_jax.models.autoencoder import ARCHITECTURE as AUTOENCODER
from efficientad_jax.models.autoencoder import bottleneck_kernel, decoder_sizes
from efficientad_jax.models.pdn import ARCHITECTURES, pdn_output_size
from efficientad_jax.serving import thresholds

FORMAT = "efficientad_jax.onnx/1"
DEFAULT_OPSET = 18  # Resize's `antialias` and `axes` attributes exist from opset 18
MAPS_SCOPE = "maps/"  # names of the nodes after the three networks: teacher normalisation, maps, resize
TILES_SCOPE = "tiles/"  # cutting images into tiles and stitching their maps (tiled models only)


class OnnxExportError(ValueError):
  """A model or environment the ONNX export cannot handle; one line naming the model and what to do."""


class _Graph:
  """Accumulates ONNX nodes and initializers with unique names."""

  def __init__(self, helper, numpy_helper):
    self.helper, self.numpy_helper = helper, numpy_helper
    self.nodes, self.initializers, self._count = [], [], 0
    self.scope = ""  # prefix of the node names: which part of the model a node belongs to (quantize.py reads it)

  def _name(self, stem: str) -> str:
    self._count += 1
    return f"{stem}_{self._count}"

  def const(self, array: Any, stem: str = "c") -> str:
    name = self._name(stem)
    self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name

  def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
    out = out or self._name(op_type.lower())
    self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=self.scope + out, **attrs))
    return out


def _conv(g: _Graph, x: str, layer: dict, *, stride: int = 1, pad: int = 0, name: str) -> str:
  """Flax conv (HWIO kernel, bias) -> ONNX Conv on NCHW (OIHW weight), symmetric zero padding."""
  kernel = np.asarray(layer["kernel"], np.float32)
  weight = g.const(kernel.transpose(3, 2, 0, 1), f"{name}_w")
  bias = g.const(np.asarray(layer["bias"], np.float32), f"{name}_b")
  return g.op(
    "Conv", x, weight, bias, kernel_shape=list(kernel.shape[:2]), strides=[stride, stride], pads=[pad, pad, pad, pad]
  )


def _resize(g: _Graph, x: str, size: Sequence[int]) -> str:
  """Bilinear resize of the spatial axes of NCHW `x` to `size`: half-pixel centres, no antialias."""
  sizes = g.const(np.asarray(size, np.int64), "sizes")
  return g.op(
    "Resize", x, "", "", sizes, axes=[2, 3], mode="linear", coordinate_transformation_mode="half_pixel", antialias=0
  )


def _pdn(g: _Graph, x: str, params: dict, size: str, name: str) -> str:
  """The unpadded PDN (models/pdn.py) on NCHW `x`."""
  for i, (_, _, _, _, relu, pool) in enumerate(ARCHITECTURES[size], start=1):
    x = _conv(g, x, params[f"conv{i}"], name=f"{name}_conv{i}")
    if relu:
      x = g.op("Relu", x)
    if pool:
      x = g.op("AveragePool", x, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], count_include_pad=1)
  return x


def _autoencoder(g: _Graph, x: str, params: dict, image_size: Sequence[int], out_size: Sequence[int]) -> str:
  """The autoencoder (`models.autoencoder.ARCHITECTURE`) on NCHW `x` [N, 3, H, W], inference mode (no dropout)."""
  h, w = image_size
  sizes = tuple(zip(decoder_sizes(h), decoder_sizes(w)))
  for layer in AUTOENCODER:
    if layer.resize is not None:
      x = _resize(g, x, out_size if layer.resize < 0 else sizes[layer.resize])
    kernel = (bottleneck_kernel(h), bottleneck_kernel(w))
    if not layer.kernel and tuple(np.shape(params[layer.name]["kernel"])[:2]) != kernel:
      raise OnnxExportError(f"autoencoder bottleneck kernel does not fit image size {h}x{w}")
    x = _conv(g, x, params[layer.name], stride=layer.stride, pad=layer.pad, name=f"ae_{layer.name}")
    if layer.relu:
      x = g.op("Relu", x)
  return x


def _channel_mse(g: _Graph, a: str, b: str) -> str:
  """mean_c (a - b)^2: [N, C, h, w] -> [N, 1, h, w]."""
  d = g.op("Sub", a, b)
  return g.op("ReduceMean", g.op("Mul", d, d), g.const(np.asarray([1], np.int64), "axes"), keepdims=1)


def _normalize_map(g: _Graph, m: str, start: Any, end: Any, scale: float) -> str:
  """scale * (m - q_a) / (q_b - q_a), in the order of `normalization.normalize_map`."""
  start, end = np.float32(start), np.float32(end)
  shifted = g.op("Sub", m, g.const(np.asarray(start, np.float32), "q_start"))
  scaled = g.op("Mul", shifted, g.const(np.asarray(scale, np.float32), "scale"))
  return g.op("Div", scaled, g.const(np.asarray(end - start, np.float32), "q_range"))


def _slice_channels(g: _Graph, x: str, start: int, end: int) -> str:
  const = lambda v, n: g.const(np.asarray([v], np.int64), n)
  return g.op("Slice", x, const(start, "start"), const(end, "end"), const(1, "axis"))


def _cut(g: _Graph, x: str, tiling: tiles.Tiling) -> str:
  """NCHW [N, 3, H, W] -> [n * N, 3, T, T], tile-major (all images' first tile, then the second, ...)."""
  t = tiling.tile
  parts = [
    g.op(
      "Slice",
      x,
      g.const(np.asarray([y, x0], np.int64), "tile_start"),
      g.const(np.asarray([y + t, x0 + t], np.int64), "tile_end"),
      g.const(np.asarray([2, 3], np.int64), "tile_axes"),
    )
    for y, x0 in tiling.boxes
  ]
  return g.op("Concat", *parts, axis=0)


def _stitch(g: _Graph, maps: str, tiling: tiles.Tiling) -> str:
  """Tile maps [n * N, 1, T, T] (tile-major) -> [N, 1, H, W]: each tile weighted by `tiling.window`, zero-padded
  to its place, summed, divided by `tiling.coverage` (`inference.stitch`)."""
  t, (height, width) = tiling.tile, tiling.size
  per_tile = g.op("Reshape", maps, g.const(np.asarray([tiling.count, -1, 1, t, t], np.int64), "tile_shape"))
  window = g.const(tiling.window.reshape(1, 1, t, t), "tile_window")
  total = None
  for k, (y, x0) in enumerate(tiling.boxes):
    picked = g.op("Gather", per_tile, g.const(np.asarray([k], np.int64), "tile_index"), axis=0)  # [1, N, 1, T, T]
    one = g.op("Squeeze", picked, g.const(np.asarray([0], np.int64), "axes"))  # [N, 1, T, T]
    pads = np.asarray([0, 0, y, x0, 0, 0, height - y - t, width - x0 - t], np.int64)
    placed = g.op("Pad", g.op("Mul", one, window), g.const(pads, "tile_pads"), mode="constant")
    total = placed if total is None else g.op("Add", total, placed)
  return g.op("Div", total, g.const(tiling.coverage.reshape(1, 1, height, width), "tile_coverage"))


def build_graph(g: _Graph, model: Any) -> None:
  """Appends `image` -> (`anomaly_map`, `score`) for a loaded PDN model (`saved_model.LoadedModel`) to `g`."""
  cfg, det = model.cfg, model.detector
  tiling = tiles.from_model(cfg.model)
  size, c = cfg.model.size, cfg.model.teacher_channels
  s = tiles.network_size(model.image_size, tiling)  # what the networks see
  h, w = pdn_output_size(s, size)
  x = g.op("Transpose", "image", perm=[0, 3, 1, 2])  # NHWC -> NCHW
  if tiling is not None:
    g.scope = TILES_SCOPE
    x = _cut(g, x, tiling)
  # Networks.
  g.scope = "teacher/"
  t = _pdn(g, x, det.params["teacher"], size, "teacher")
  g.scope = "student/"
  st = _pdn(g, x, det.params["student"], size, "student")
  g.scope = "autoencoder/"
  ae = _autoencoder(g, x, det.params["autoencoder"], s, (h, w))
  # Teacher normalisation and maps (inference.raw_maps, combine_maps, to_image_map).
  g.scope = MAPS_SCOPE
  mean = np.asarray(det.teacher_stats.mean, np.float32).reshape(1, c, 1, 1)
  std = np.asarray(det.teacher_stats.std, np.float32).reshape(1, c, 1, 1)
  t = g.op("Div", g.op("Sub", t, g.const(mean, "teacher_mean")), g.const(std, "teacher_std"))
  map_st = _channel_mse(g, t, _slice_channels(g, st, 0, c))
  map_ae = _channel_mse(g, ae, _slice_channels(g, st, c, 2 * c))
  q, mc = det.quantiles, cfg.maps
  st_n = _normalize_map(g, map_st, q.st_start, q.st_end, mc.scale)
  ae_n = _normalize_map(g, map_ae, q.ae_start, q.ae_end, mc.scale)
  combined = g.op(
    "Add",
    g.op("Mul", st_n, g.const(np.asarray(mc.st_weight, np.float32), "st_weight")),
    g.op("Mul", ae_n, g.const(np.asarray(mc.ae_weight, np.float32), "ae_weight")),
  )
  if tiling is None:
    g.op("Squeeze", combined, g.const(np.asarray([1], np.int64), "axes"), out="map_combined")
  else:  # [n * N, 1, h, w] tile-major -> [N, n * h, w]: each image's tiles stacked along the rows (per_image)
    by_tile = g.op("Reshape", combined, g.const(np.asarray([tiling.count, -1, h, w], np.int64), "tiles_shape"))
    by_image = g.op("Transpose", by_tile, perm=[1, 0, 2, 3])
    g.op("Reshape", by_image, g.const(np.asarray([0, tiling.count * h, w], np.int64), "per_image"), out="map_combined")
  p = int(mc.pad)
  padded = g.op(
    "Pad",
    combined,
    g.const(np.asarray([0, 0, p, p, 0, 0, p, p], np.int64), "pads"),
    g.const(np.asarray(0.0, np.float32), "zero"),
    mode="constant",
  )
  full = _resize(g, padded, s)
  if tiling is not None:
    g.scope = TILES_SCOPE
    full = _stitch(g, full, tiling)
  amap = g.op("Squeeze", full, g.const(np.asarray([1], np.int64), "axes"), out="anomaly_map")
  g.op("ReduceMax", amap, g.const(np.asarray([1, 2], np.int64), "axes"), keepdims=0, out="score")


def metadata(model: Any, source: str, opset: int) -> dict[str, str]:
  """metadata_props: everything a caller needs besides the graph (all values are strings)."""
  cfg, s = model.cfg, model.image_size
  return {
    "format": FORMAT,
    "source": source,
    "opset": str(opset),
    "threshold": repr(float(model.threshold)),
    "image_size": str(s),  # 'S' or 'HxW'
    "image_height": str(s[0]),
    "image_width": str(s[1]),
    "tile": str(cfg.model.tile),  # 0: none; else the graph cuts T x T tiles and stitches their maps itself
    "tile_overlap": str(cfg.model.tile_overlap),
    "model_size": str(model.meta.get("model_size", cfg.model.size)),
    "mean": json.dumps(list(cfg.data.mean)),
    "std": json.dumps(list(cfg.data.std)),
    "preprocessing": preprocess.describe(s),
    "resize": "PIL.Image.BILINEAR",
    "outputs": json.dumps(
      {
        "anomaly_map": f"float32 [N, {s[0]}, {s[1]}]",
        "score": "float32 [N], max of anomaly_map",
        "map_combined": (
          "float32 [N, h, w], before zero padding (map_config pad) and the bilinear resize"
          if cfg.model.tile == 0
          else "float32 [N, n * h, w], each image's n tile maps stacked along the rows, before padding and stitching"
        ),
      }
    ),
    "decision": "anomalous if score > threshold",
    "threshold_rule": str(model.meta.get("threshold_rule", "")),
    "validation_median": json.dumps(thresholds.median(model.validation_scores)),
    "normalized_score": thresholds.NORMALIZED,
    "map_config": json.dumps(
      {k: getattr(cfg.maps, k) for k in ("q_start", "q_end", "scale", "st_weight", "ae_weight", "pad")}
    ),
    "compute_dtype": f"float32 (the model computes in {cfg.model.dtype})",
  }


def _onnx():
  try:
    import onnx
  except ImportError:
    raise OnnxExportError(
      "the onnx package is not installed (--format onnx): pip install 'efficientad_jax[onnx]'"
    ) from None
  return onnx


def check_exportable(model: Any, source: str = "model") -> None:
  """Refuses what the graph builder does not cover, with one line instead of an AttributeError later."""
  if model.method.name != "efficientad":
    raise OnnxExportError(
      f"{source}: ONNX export supports EfficientAD PDN models only, not method "
      f"{model.method.name!r} (AST and other variants): export it with --format jax"
    )
  if model.cfg.model.size not in ARCHITECTURES:
    raise OnnxExportError(f"{source}: unknown PDN size {model.cfg.model.size!r}")


def _combined_size(model: Any, tiling: tiles.Tiling | None) -> tuple[int, int]:
  h, w = pdn_output_size(tiles.network_size(model.image_size, tiling), model.cfg.model.size)
  return (h if tiling is None else tiling.count * h), w


def to_onnx(model: Any, source: str = "model", opset: int = DEFAULT_OPSET):
  """The `onnx.ModelProto` of a loaded model (`saved_model.LoadedModel`), checked by `onnx.checker`."""
  check_exportable(model, source)
  if opset < DEFAULT_OPSET:
    raise OnnxExportError(f"opset {opset} (--opset): Resize needs opset >= {DEFAULT_OPSET} for antialias=0")
  onnx = _onnx()
  helper = onnx.helper
  g = _Graph(helper, onnx.numpy_helper)
  build_graph(g, model)
  s, tiling = model.image_size, tiles.from_model(model.cfg.model)
  graph = helper.make_graph(
    g.nodes,
    "efficientad",
    [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", *s, 3])],
    [
      helper.make_tensor_value_info("anomaly_map", onnx.TensorProto.FLOAT, ["N", *s]),
      helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, ["N"]),
      helper.make_tensor_value_info(
        "map_combined",
        onnx.TensorProto.FLOAT,
        ["N", *_combined_size(model, tiling)],
      ),
    ],
    initializer=g.initializers,
  )
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="efficientad_jax")
  proto.ir_version = 9  # readable by onnxruntime >= 1.15
  helper.set_model_props(proto, metadata(model, source, opset))
  onnx.checker.check_model(proto)
  return proto


def write_onnx(proto: Any, out: str | pathlib.Path) -> pathlib.Path:
  """Writes `proto` to `out` atomically: a reader never sees half a file."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(proto.SerializeToString())
  tmp.replace(out)
  return out


def export_onnx(model_path: str | pathlib.Path, out: str | pathlib.Path, opset: int = DEFAULT_OPSET) -> pathlib.Path:
  """Loads RUN (or RUN/model) and writes its ONNX graph to `out` (atomically)."""
  from efficientad_jax.serving import saved_model

  source = str(saved_model.model_dir(model_path))
  return write_onnx(to_onnx(saved_model.load(model_path), source, opset), out)
