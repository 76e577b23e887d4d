"""One interface for running a saved model on preprocessed images, whatever executes it (docs/method.md §7).

  runner = backends.make(model, "openvino")          # "jax" (default), "onnxruntime" or "openvino"
  out = runner(images, out_size=(H, W))              # images [B, S, S, 3] float32, normalised (predict.prepare)
  out["anomaly_map"]  # float32 [B, H, W];  out["score"]  # float32 [B] = max of the map

"jax" is the model's own jitted predict (`LoadedModel.predict_fn`). "onnxruntime" and "openvino" run the ONNX
graph of `onnx_graph` (built in memory from the model, or read from an exported .onnx or OpenVINO .xml) up to
its `map_combined` output [B, h, w]; `to_image_map` then zero-pads it and resizes it to (H, W) on the host, the
same two steps as `inference.to_image_map` (`resize_map` is jax's bilinear resize written in NumPy), and the
score is the max of that map. The graph's own S x S `anomaly_map` is for callers without this module: resizing
it again to another size would interpolate twice (a few percent of the map's range apart from jax near steep
edges). Everything before (decode, resize, normalise) and after (threshold, files) is the caller's and the
same for every backend (`predict.py`).

Agreement with "jax" in float32 (tests/test_backends.py): maps and scores within 1e-4, at the model's size
and at another image size.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BACKENDS = ("jax", "onnxruntime", "openvino")
EXTRA = "deploy"  # the pip extra holding onnx, onnxruntime, openvino and nncf (pyproject.toml)


class BackendError(ValueError):
  """An unknown backend, a missing package or an unusable graph file; one line saying what to do."""


def missing(package: str, why: str) -> BackendError:
  return BackendError(
    f"the {package} package is not installed ({why}): pip install 'efficientad_jax[{EXTRA}]' (or pip install {package})"
  )


# --- The map at the image's size.


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear interpolation with half-pixel centres, edges clamped.

  Output pixel i samples the input at x = (i + 0.5) * n_in / n_out - 0.5, between pixels floor(x) and
  floor(x) + 1, each clamped into [0, n_in - 1]: the weights of `jax.image.resize(method='bilinear',
  antialias=False)` and of ONNX Resize (linear, half_pixel, antialias 0), the two resizes of the predict path.
  """
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  lo = np.floor(x)
  frac = x - lo
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(weights, (rows, np.clip(lo, 0, n_in - 1).astype(int)), 1.0 - frac)
  np.add.at(weights, (rows, np.clip(lo + 1, 0, n_in - 1).astype(int)), frac)
  return weights.astype(np.float32)


def resize_map(maps: np.ndarray, out_size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of maps [B, h, w] to [B, *out_size] (half-pixel centres, no antialias, edges clamped).

  The graph backends' last step: their S x S map to the image's (H, W), as `inference.to_image_map` resizes
  in the jax path. Separable: out = R_y @ m @ R_x^T with `_interpolation_matrix` rows.
  """
  maps = np.asarray(maps, np.float32)
  h, w = maps.shape[1:]
  if (h, w) == tuple(out_size):
    return maps
  ry, rx = _interpolation_matrix(out_size[0], h), _interpolation_matrix(out_size[1], w)
  return np.einsum("yh,bhw,xw->byx", ry, maps, rx, optimize=True).astype(np.float32)


def to_image_map(combined: np.ndarray, out_size: Sequence[int], pad: int) -> dict[str, np.ndarray]:
  """The combined map [B, h, w] -> {'anomaly_map' [B, H, W]: zero-padded by `pad` per side (the PDN's lost
  border), resized to (H, W); 'score' [B]: its max}, as `inference.to_image_map` and `inference.predict`."""
  padded = np.pad(np.asarray(combined, np.float32), ((0, 0), (pad, pad), (pad, pad)))
  amap = resize_map(padded, out_size)
  return {"anomaly_map": amap, "score": amap.max(axis=(1, 2))}


# --- Backends.


@dataclasses.dataclass(frozen=True)
class Runner:
  """A model ready to run: `runner(images [B, h, w, 3] float32, out_size=(H, W))` -> {'anomaly_map' [B, H, W],
  'score' [B]}, NumPy float32 on the host, (h, w) the model's image size. `graph` is the file it read ('' when
  built in memory or jax)."""

  name: str
  image_size: tuple[int, int]
  run: Callable[[np.ndarray, tuple[int, int]], dict[str, np.ndarray]]
  graph: str = ""

  def __call__(self, images: np.ndarray, out_size: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    images = np.asarray(images, np.float32)
    h, w = self.image_size
    if images.ndim != 4 or images.shape[1:] != (h, w, 3):
      raise BackendError(f"images of shape {images.shape}: the model takes [B, {h}, {w}, 3] (predict.prepare)")
    return self.run(images, tuple(out_size or (h, w)))


def _jax(model: Any) -> Runner:
  def run(images, out_size):
    out = model.predict_fn(model.detector, images, out_size=out_size)
    return {"anomaly_map": np.asarray(out["anomaly_map"]), "score": np.asarray(out["score"])}

  return Runner("jax", model.image_size, run)


def _graph_bytes(model: Any, graph: str | pathlib.Path | None) -> bytes:
  """The ONNX graph to run: the file `graph`, else built from the model (`onnx_graph.to_onnx`)."""
  if graph is not None:
    return pathlib.Path(graph).read_bytes()
  from efficientad_jax.serving import onnx_graph

  try:
    return onnx_graph.to_onnx(model).SerializeToString()
  except onnx_graph.OnnxExportError as e:
    if "not installed" in str(e):
      raise missing("onnx", "the graph backends build the ONNX graph from the model") from None
    raise


def _check_size(graph_size: Sequence[Any], model: Any, graph: str | pathlib.Path | None) -> None:
  """graph_size: the graph input's (H, W)."""
  h, w = model.image_size
  if graph is not None and tuple(graph_size) != (h, w):
    raise BackendError(
      f"{graph}: the graph takes {graph_size[0]}x{graph_size[1]} images (H x W), the model {h}x{w}: "
      "export the graph from this model"
    )


def graph_output(model: Any) -> tuple[str, Callable[[np.ndarray, Sequence[int]], dict[str, np.ndarray]]]:
  """(the graph output to read, how it becomes the map at an image's size). Whole images: `map_combined`,
  padded and resized on the host (`to_image_map`). Tiles (model.tile > 0): the graph's own stitched
  `anomaly_map` [B, H, W], resized to the image's size (`resize_map`), as the jax path resizes its stitched map."""
  if model.cfg.model.tile:

    def finish(amap, out_size):
      amap = resize_map(amap, out_size)
      return {"anomaly_map": amap, "score": amap.max(axis=(1, 2))}

    return "anomaly_map", finish
  pad = int(model.cfg.maps.pad)
  return "map_combined", lambda combined, out_size: to_image_map(combined, out_size, pad)


def _check_outputs(names: Sequence[str], graph: str | pathlib.Path | None) -> None:
  if "map_combined" not in names:
    raise BackendError(f"{graph}: the graph has no map_combined output (exported by an older version): export it again")


def onnxruntime_module(why: str = "--backend onnxruntime") -> Any:
  try:
    import onnxruntime
  except ImportError:
    raise missing("onnxruntime", why) from None
  return onnxruntime


def _onnxruntime(model: Any, graph: str | pathlib.Path | None, threads: int) -> Runner:
  onnxruntime_module()
  if graph is not None and pathlib.Path(graph).suffix != ".onnx":
    raise BackendError(f"{graph}: onnxruntime runs .onnx files (export with --format onnx)")
  return onnxruntime_runner(model, _graph_bytes(model, graph), threads, graph)


def onnxruntime_runner(
  model: Any, graph_bytes: bytes, threads: int = 0, graph: str | pathlib.Path | None = None
) -> Runner:
  """A `Runner` of a serialized ONNX graph (e.g. one just quantized) in an onnxruntime CPU session."""
  ort = onnxruntime_module()
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  session = ort.InferenceSession(graph_bytes, options, providers=["CPUExecutionProvider"])
  _check_size(session.get_inputs()[0].shape[1:3], model, graph)
  _check_outputs([o.name for o in session.get_outputs()], graph)
  name, finish = graph_output(model)
  run = lambda images, out_size: finish(session.run([name], {"image": images})[0], out_size)
  return Runner("onnxruntime", model.image_size, run, str(graph or ""))


def openvino_core(threads: int = 0, why: str = "--backend openvino") -> Any:
  try:
    import openvino as ov
  except ImportError:
    raise missing("openvino", why) from None
  core = ov.Core()
  if threads:
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
  return core


def read_openvino(core: Any, model: Any, graph: str | pathlib.Path | None) -> Any:
  """An `openvino.Model`: an IR (.xml beside its .bin), an .onnx file, or the graph built from `model`."""
  if graph is not None and pathlib.Path(graph).suffix == ".xml":
    return core.read_model(str(graph))
  if graph is not None and pathlib.Path(graph).suffix != ".onnx":
    raise BackendError(f"{graph}: openvino runs .xml (--format openvino) or .onnx (--format onnx) files")
  return core.read_model(io.BytesIO(_graph_bytes(model, graph)))


def _openvino(model: Any, graph: str | pathlib.Path | None, threads: int) -> Runner:
  core = openvino_core(threads)
  return openvino_runner(model, read_openvino(core, model, graph), core, graph)


def openvino_runner(model: Any, ov_model: Any, core: Any, graph: str | pathlib.Path | None = None) -> Runner:
  """A `Runner` of an `openvino.Model` in memory (e.g. one just quantized), compiled for the CPU."""
  # float32 wherever the graph is not int8: OpenVINO's CPU plugin would otherwise run in bf16 where the CPU has
  # it (AMX, AVX512-BF16)
  compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
  shape = compiled.input(0).get_partial_shape()
  _check_size((shape[1].get_length(), shape[2].get_length()), model, graph)
  _check_outputs([name for o in compiled.outputs for name in o.get_names()], graph)
  name, finish = graph_output(model)
  request, output = compiled.create_infer_request(), compiled.output(name)
  run = lambda images, out_size: finish(request.infer({"image": images})[output], out_size)

  return Runner("openvino", model.image_size, run, str(graph or ""))


def make(model: Any, backend: str = "jax", graph: str | pathlib.Path | None = None, threads: int = 0) -> Runner:
  """A `Runner` of a loaded model (`saved_model.LoadedModel`) on `backend`.

  Args:
    graph: onnxruntime / openvino: an exported graph file to run instead of building it from `model` (e.g.
      an int8 one); its image size must be the model's.
    threads: CPU threads of the graph backends (0: the runtime's default, all cores).
  """
  if backend not in BACKENDS:
    raise BackendError(f"unknown backend {backend!r} (--backend): choose one of {', '.join(BACKENDS)}")
  if graph is not None and not pathlib.Path(graph).is_file():
    raise BackendError(f"{graph}: no such graph file (--graph)")
  if backend == "jax":
    if graph is not None:
      raise BackendError("--graph runs with --backend onnxruntime or openvino, not jax")
    return _jax(model)
  if model.method.name != "efficientad":
    raise BackendError(
      f"--backend {backend} runs EfficientAD PDN models only, not method {model.method.name!r}: use --backend jax"
    )
  return (_onnxruntime if backend == "onnxruntime" else _openvino)(model, graph, threads)


def resolve(model: Any, backend: str | Runner) -> Runner:
  """A `Runner` as it is, or a backend name made into one (a name builds a new session on every call)."""
  return backend if isinstance(backend, Runner) else make(model, backend)
