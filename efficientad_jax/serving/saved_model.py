"""The saved model of any method: the folder training writes, and the method-neutral record it loads into.

Layout (README, "Run directory"):
  RUN/model/arrays/   orbax StandardSave of the method's array tree (networks, statistics, quantiles)
  RUN/model/meta/     JSON: 'method', 'format', 'config', 'image_size', 'threshold', provenance
A meta without 'method' (models saved before there were two methods) is an EfficientAD model.

What differs between methods sits behind one small interface, `Method`: each method module defines its
`SAVED_MODEL` and `METHODS` names that module, so it is imported only when a model of that method is saved
or loaded. This module imports no method, nor `predict` or `evaluate`: they all import it, never the
reverse, which is what keeps the package free of import cycles (tests/test_imports.py).

  model = load("runs/widget")                                    # RUN or RUN/model, either method
  out = model.predict_fn(model.detector, images, out_size=(H, W))  # {'anomaly_map', 'score', ...}
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from efficientad_jax.config import ImageSize

MODEL_FORMAT = 1  # bump when the folder's layout changes
DEFAULT_METHOD = "efficientad"  # the method of a meta without 'method'
METHODS = {
  "efficientad": "efficientad_jax.efficientad.inference",
  "efficientad_ast": "efficientad_jax.efficientad_ast.inference",
}


class Inputs(NamedTuple):
  """What a caller needs to feed a model: image side S, normalisation, compute dtype, data seed."""

  image_size: ImageSize  # (H, W) the networks see
  mean: Sequence[float]
  std: Sequence[float]
  dtype: str
  seed: int  # the run's seed: evaluation splits the data with it, as training did


class Method(NamedTuple):
  """One method's part in saving and loading.

  Attributes:
    name: meta['method'].
    config: meta['config'] (a dict) -> the method's config; ValueError when it does not fit.
    inputs: config -> `Inputs`.
    predict: config -> (pure fn(detector, images [B, S, S, 3], out_size) -> {'map_st', 'map_ae',
      'map_combined', 'anomaly_map' [B, *out_size], 'score' [B]}, the same jitted with out_size static).
      The pure one is for tracing inside another transformation (export), where a nested `compiler.jit`
      is refused.
    to_arrays: the in-memory detector -> the array tree written to arrays/.
    from_arrays: the restored array tree -> the detector.
  """

  name: str
  config: Callable[[dict], Any]
  inputs: Callable[[Any], Inputs]
  predict: Callable[[Any], tuple[Callable[..., dict], Callable[..., dict]]]
  to_arrays: Callable[[Any], dict]
  from_arrays: Callable[[dict], Any]


def config_inputs(cfg: Any) -> Inputs:
  """`Inputs` of any method's config: every method keeps them in the shared sections (model.image_size,
  model.dtype, data.mean / std, train.seed)."""
  return Inputs(
    image_size=ImageSize(cfg.model.image_size),
    mean=cfg.data.mean,
    std=cfg.data.std,
    dtype=cfg.model.dtype,
    seed=cfg.train.seed,
  )


def method(name: str) -> Method:
  """The `Method` registered under `name`, importing its module on first use."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r} in the saved model's meta (known: {', '.join(METHODS)})")
  return importlib.import_module(METHODS[name]).SAVED_MODEL


def model_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A run directory (with model/ inside) or the model folder itself -> the model folder."""
  path = pathlib.Path(path)
  return path / "model" if (path / "model" / "meta").exists() else path


# --- The folder.


def save(path: str | pathlib.Path, method_name: str, detector: Any, meta: dict[str, Any]) -> pathlib.Path:
  """Writes a complete model (atomically) to `path`; `meta` is JSON (config, sizes, threshold, provenance)."""
  path = pathlib.Path(path).absolute()
  meta = dict(meta, method=method_name, format=MODEL_FORMAT)
  tree = jax.tree_util.tree_map(np.asarray, method(method_name).to_arrays(detector))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
  return path


def read(path: str | pathlib.Path) -> tuple[dict, dict[str, Any]]:
  """(array tree, meta) of a model folder; needs no method, training code or data."""
  path = pathlib.Path(path).absolute()
  if not (path / "meta").exists() or not (path / "arrays").exists():
    raise FileNotFoundError(
      f"{path} is not a saved model (expected arrays/ and meta/ inside; "
      "pass RUN/model or the --model folder written by training)"
    )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(path, ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta = restored["meta"]
  if meta.get("format") != MODEL_FORMAT:
    raise ValueError(f"{path}: model format {meta.get('format')} is not supported (expected {MODEL_FORMAT})")
  return restored["arrays"], dict(meta, method=meta.get("method", DEFAULT_METHOD))


# --- The loaded model.


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A saved model ready for inference, whatever its method.

  Attributes:
    method: the method's `Method`.
    detector: the method's arrays (EfficientAD: `inference.Detector`; AST: its params), on the device.
    cfg: the method's training config stored in the model.
    meta: the saved metadata ('method', 'threshold', 'image_size', 'model_size', ...).
    predict: the pure predict function (`Method.predict`), for tracing.
    predict_fn: the jitted one: fn(detector, images [B, S, S, 3], out_size=(H, W)).
  """

  method: Method
  detector: Any
  cfg: Any
  meta: dict
  predict: Callable[..., dict]
  predict_fn: Callable[..., dict]

  @property
  def inputs(self) -> Inputs:
    return self.method.inputs(self.cfg)

  @property
  def image_size(self) -> ImageSize:
    return self.inputs.image_size

  @property
  def threshold(self) -> float:
    """Decision threshold: an image is anomalous when its score > threshold (from validation normals)."""
    return float(self.meta["threshold"])

  @property
  def validation_scores(self) -> list[float] | None:
    """The validation normals' scores, sorted (None for models saved before they were recorded)."""
    return self.meta.get("validation_scores")


def load(path: str | pathlib.Path) -> LoadedModel:
  """Restores a model saved by training (`save`) from RUN or RUN/model, of any method."""
  folder = model_dir(path)
  arrays, meta = read(folder)
  for key in ("config", "threshold", "image_size"):
    if key not in meta:
      raise ValueError(f"{folder}: the saved model's meta has no {key!r}")
  spec = method(meta["method"])
  cfg = spec.config(meta["config"])
  if spec.inputs(cfg).image_size != ImageSize(meta["image_size"]):
    raise ValueError(
      f"{folder}: meta image_size {meta['image_size']} differs from the config's {spec.inputs(cfg).image_size}"
    )
  pure, jitted = spec.predict(cfg)
  return LoadedModel(
    method=spec, detector=jax.device_put(spec.from_arrays(arrays)), cfg=cfg, meta=meta, predict=pure, predict_fn=jitted
  )
