"""int8 OpenVINO IR of a saved model that keeps its accuracy: NNCF post-training quantization, calibrated on the
run's own normal training images, measured against float on the run's test images (docs/method.md §7, §9). What
stays float, the calibration images and the measurement are shared with the int8 ONNX graph for onnxruntime
(`onnx_int8.py`).

  python -m experiments.export --model RUN --format openvino --int8 --out model_int8.xml [--max-auroc-drop 0.005]

Only the three networks (teacher, student, autoencoder) run in int8 (weights per output channel, activations
per tensor), and not all of them. What stays float32, and why (measurements: BUILD_NOTES.md, "CPU deployment
backends"):
- everything after the networks' outputs: the teacher normalisation (T - mean) / std, the squared
  differences mean_c (T_hat - S)^2 and mean_c (A - S')^2, the quantile normalisation, the weighted sum,
  padding and resize (the graph's `maps/` nodes, `onnx_graph`). The maps are differences of nearly equal
  feature maps (a student trained to match its teacher); 8-bit activations over the features' full range
  round those differences to a few steps, so quantizing them (NNCF's default: everything) flattens the maps
  and pulls the scores towards one value.
- the first convolution of each network, whose input is the image: calibrated on normal images only, an
  int8 input range clips the colours of an anomaly that no normal image has, and its score with them.
Activation ranges are the minimum and maximum over the calibration images (NNCF's MINMAX), not an average of
per-image ranges: an anomaly's features lie beyond the normal ones, and the widest range clips them least.

The export then runs float (the same graph, OpenVINO float32) and int8 on the run's test images and writes
into the IR's metadata (rt_info, `openvino_ir.RT_INFO`) the image AU-ROC of both, AU-PRO@0.3 of both where the
test set has masks, and the largest score difference; it refuses, writing nothing, when the image AU-ROC drops
by more than `max_auroc_drop`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficientad_jax import metrics
from efficientad_jax.data import make_datasets
from efficientad_jax.serving import backends, onnx_graph, openvino_ir

CALIBRATION_IMAGES = 300  # NNCF's default subset size; a run with fewer normal training images uses them all
MAX_AUROC_DROP = 0.005  # default refusal bound: image AU-ROC of float minus int8
PRO_LIMIT = 0.3  # AU-PRO up to this false-positive rate (the paper's)
NETWORKS = ("teacher/", "student/", "autoencoder/")  # the node-name scopes of the networks (`onnx_graph`)


class QuantizationError(ValueError):
  """An int8 model that loses more accuracy than allowed, or a run it cannot be measured on; one line."""


@dataclasses.dataclass(frozen=True)
class RunImages:
  """A run's normal training images and test records, as the network takes them (`pipeline.eval_element`)."""

  train: np.ndarray  # [N, S, S, 3] float32
  test: list[dict]  # {'image' [S, S, 3], 'orig_size', 'label', 'mask' [H, W], ...}


def run_images(model: Any, folder: pathlib.Path, max_train: int = CALIBRATION_IMAGES) -> RunImages:
  """The run's training normals (the first `max_train`, validation ones excluded) and test records, from the
  data section saved with the model; a synthetic run's data live in RUN/data (`training.engine.resolve_paths`)."""
  data = model.cfg.data
  if data.dataset == "synthetic" and not data.root:
    data = dataclasses.replace(data, root=str(folder.parent / "data"))
  ds = make_datasets(data, image_size=model.image_size, seed=model.inputs.seed)
  n = min(len(ds.train_eval), max_train)
  train = np.stack([ds.train_eval[i]["image"] for i in range(n)]).astype(np.float32)
  return RunImages(train=train, test=[ds.test[i] for i in range(len(ds.test))])


def float_nodes(names: Sequence[str]) -> list[str]:
  """Of a graph's node names in topological order, those that stay float32 (module doc): the maps (and a tiled
  model's stitching) and each network's first convolution. The names are `onnx_graph`'s, which name a node
  SCOPE/OPTYPE_N: the ONNX Conv 'SCOPE/conv_N' (its own name, also after onnxruntime's quantizer), which OpenVINO
  reads as Convolution 'SCOPE/conv_N/WithoutBiases' and its bias Add 'SCOPE/conv_N'. Both int8 paths call this."""
  keep = [n for n in names if n.startswith((onnx_graph.MAPS_SCOPE, onnx_graph.TILES_SCOPE))]
  for scope in NETWORKS:
    # the first in topological order: every other conv of the network depends on it
    first = next(n for n in names if n.startswith(scope + "conv_"))
    conv = scope + first.removeprefix(scope).split("/")[0]
    keep += [n for n in names if n == conv or n.startswith(conv + "/")]
  return keep


def first_convs(keep_float: Sequence[str]) -> list[str]:
  """The ONNX names of the first convolutions among `float_nodes` (for the figures: one list for both paths)."""
  return [n for n in keep_float if n.startswith(NETWORKS) and n.count("/") == 1]


def openvino_names(ov_model: Any) -> list[str]:
  """An `openvino.Model`'s node names, in topological order."""
  return [op.get_friendly_name() for op in ov_model.get_ordered_ops()]


def quantize(ov_model: Any, images: np.ndarray, keep_float: Sequence[str] | None = None) -> Any:
  """NNCF post-training int8 quantization of an `openvino.Model` calibrated on `images` [N, S, S, 3] (all
  of them), with the nodes named in `keep_float` (default `float_nodes`) kept in float32."""
  try:
    import nncf
  except ImportError:
    raise backends.missing("nncf", "--int8") from None
  keep_float = float_nodes(openvino_names(ov_model)) if keep_float is None else list(keep_float)
  dataset = nncf.Dataset([x[None] for x in images])
  ignored = nncf.IgnoredScope(names=keep_float, validate=False) if keep_float else None
  log = logging.getLogger("nncf")
  level, _ = log.level, log.setLevel(logging.WARNING)  # NNCF logs one INFO line per node it leaves in float
  from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
  from nncf.quantization.range_estimator import RangeEstimatorParametersSet

  ranges = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
  try:
    return nncf.quantize(
      ov_model,
      dataset,
      subset_size=len(images),
      target_device=nncf.TargetDevice.CPU,
      ignored_scope=ignored,
      advanced_parameters=ranges,
    )
  finally:
    log.setLevel(level)


def scores_and_maps(runner: backends.Runner, test: Sequence[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
  """Each test image's score and map at its own size (one image per call: sizes may differ)."""
  outs = [runner(r["image"][None], out_size=tuple(int(v) for v in r["orig_size"])) for r in test]
  return np.array([float(o["score"][0]) for o in outs]), [o["anomaly_map"][0] for o in outs]


def accuracy(float_runner: backends.Runner, int8_runner: backends.Runner, test: Sequence[dict]) -> dict[str, Any]:
  """Image AU-ROC of float and int8, AU-PRO@0.3 of both where anomalous test images have masks (else None),
  the largest absolute score difference and the float scores' spread (max - min) to read it against."""
  labels = np.array([int(r["label"]) for r in test])
  if labels.min() == labels.max():
    raise QuantizationError("the run's test set needs normal and anomalous images to measure the int8 model")
  masks = [np.asarray(r["mask"], bool) for r in test]
  has_masks = any(m.any() for m, y in zip(masks, labels) if y)
  figures: dict[str, Any] = {}
  scores = {}
  for name, runner in (("float", float_runner), ("int8", int8_runner)):
    scores[name], maps = scores_and_maps(runner, test)
    figures[f"image_auroc_{name}"] = metrics.auroc(scores[name], labels)
    figures[f"au_pro_{PRO_LIMIT}_{name}"] = metrics.au_pro(maps, masks, [PRO_LIMIT])[PRO_LIMIT] if has_masks else None
  figures["max_score_difference"] = float(np.abs(scores["int8"] - scores["float"]).max())
  figures["float_score_range"] = float(np.ptp(scores["float"]))
  figures["image_auroc_drop"] = figures["image_auroc_float"] - figures["image_auroc_int8"]
  figures["test_images"] = len(test)
  return figures


def check_bound(max_auroc_drop: float) -> None:
  if max_auroc_drop < 0:
    raise QuantizationError(f"--max-auroc-drop {max_auroc_drop}: it must be >= 0 (a drop in image AU-ROC)")


def measure(
  float_runner: backends.Runner,
  int8_runner: backends.Runner,
  images: RunImages,
  keep_float: Sequence[str],
  max_auroc_drop: float,
) -> dict[str, Any]:
  """`accuracy` on the run's test images, with the calibration and float nodes; both int8 paths.

  Raises:
    QuantizationError: image AU-ROC drops by more than `max_auroc_drop`.
  """
  figures = accuracy(float_runner, int8_runner, images.test)
  figures.update(
    calibration_images=len(images.train), float_nodes=[onnx_graph.MAPS_SCOPE + "*", *first_convs(keep_float)]
  )
  drop = figures["image_auroc_drop"]
  if drop > max_auroc_drop:
    raise QuantizationError(
      f"int8 image AU-ROC {figures['image_auroc_int8']:.4f} vs float {figures['image_auroc_float']:.4f} on "
      f"{len(images.test)} test images: a drop of {drop:.4f} > {max_auroc_drop} (--max-auroc-drop); nothing written"
    )
  return figures


def export_int8(
  model_path: str | pathlib.Path, out: str | pathlib.Path, max_auroc_drop: float = MAX_AUROC_DROP
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Quantizes, measures and, within the bound, writes the int8 IR (`out` .xml + .bin); returns (path, figures).

  Raises:
    QuantizationError: image AU-ROC drops by more than `max_auroc_drop` (nothing written).
  """
  from efficientad_jax.serving import saved_model

  check_bound(max_auroc_drop)
  folder = saved_model.model_dir(model_path)
  model = saved_model.load(model_path)
  images = run_images(model, folder)
  ov_model = openvino_ir.to_openvino(model, str(folder), "int8 (activations per tensor, weights per channel)")
  core = backends.openvino_core(why="--int8")
  float_runner = backends.openvino_runner(model, ov_model.clone(), core)
  keep_float = float_nodes(openvino_names(ov_model))
  int8_model = quantize(ov_model, images.train, keep_float)
  int8_runner = backends.openvino_runner(model, int8_model, core)
  figures = measure(float_runner, int8_runner, images, keep_float, max_auroc_drop)
  openvino_ir.set_metadata(int8_model, {"int8_accuracy": json.dumps(figures)})
  return openvino_ir.write_ir(int8_model, out), figures
