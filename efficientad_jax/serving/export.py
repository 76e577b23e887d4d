"""Serialised, framework-free predict function (`jax.export`; docs/method.md §7).

  python -m experiments.export --model RUN --out model.eadx      # writes the file
  m = load_exported("model.eadx")                                # needs jax + numpy only, no flax
  out = m(images)    # images [B, H, W, 3] float32, ImageNet-normalised, any B (H x W = meta['image_size'])

The file holds the saved model's predict function, of either method (`saved_model.Method.predict`;
for EfficientAD `inference.predict`, the one inference path), lowered to StableHLO with a SYMBOLIC batch
size, and the detector's arrays (network params; for EfficientAD also teacher statistics and map quantiles)
as its arguments, so the model is not duplicated into the program's constants. It is a NumPy .npz archive:
  'exported'        uint8 bytes of `jax.export.Exported.serialize()`
  'meta'            uint8 bytes of JSON: format, method, image_size, threshold, model_size, mean, std, ...
  'param_00000'...  the detector's leaves, in the order the exported function takes them

Outputs: the dict every method's predict returns ('map_st', 'map_ae', 'map_combined' [B, h, w];
'anomaly_map' [B, H, W]; 'score' [B]). The output size is FIXED at the model's image size H x W (an image's
own size is a static shape, unknown when exporting): the map of an image of another size is `anomaly_map`
resized to that size, and its score is max(anomaly_map). That differs slightly from the in-process path, which
resizes the (EfficientAD: padded) map straight to the image's size; for images of the model's size both are
identical. Preprocessing (decode, bilinear resize to H x W, normalise with meta['mean'], meta['std']) is the
caller's (meta['preprocessing'] says it in words): `predict.prepare` does it in this library.

This module imports no flax at module level: `load_exported` runs in a process without it.
"""

from __future__ import annotations

import io
import json
import pathlib
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from efficientad_jax.config import ImageSize

FORMAT = "efficientad_jax.serving.export/1"
OUTPUTS = ("map_st", "map_ae", "map_combined", "anomaly_map", "score")
# Lowered for both by default, so a file exported on a GPU machine also runs on a laptop and vice versa
# (lowering needs no such device); pass e.g. ("tpu",) for TPUs.
DEFAULT_PLATFORMS = ("cpu", "cuda")


def _bytes(data: bytes) -> np.ndarray:
  return np.frombuffer(data, np.uint8)


def export_predict(
  model: Any, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """Exports the predict function of a loaded model of any method.

  Args:
    model: the loaded model (`saved_model.LoadedModel`).
    platforms: lowering targets (`jax.export` names: "cpu", "cuda", "rocm", "tpu").
  Returns:
    (exported fn(leaves, images [b, H, W, 3] float32) -> outputs dict, the detector leaves as NumPy).
  """
  leaves, treedef = jax.tree_util.tree_flatten(model.detector)
  h, w = model.image_size

  def fn(flat: list, images: jax.Array) -> dict:
    # The detector is rebuilt inside the trace: the exported signature is a plain list of arrays,
    # so deserialising needs none of our pytree classes (nor flax).
    detector = jax.tree_util.tree_unflatten(treedef, flat)
    return model.predict(detector, images, (h, w))

  specs = [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf in leaves]
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, 3"), np.float32)
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(specs, images)
  return exported, [np.asarray(leaf) for leaf in leaves]


def export_model(
  model_path: str | pathlib.Path, out: str | pathlib.Path, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> pathlib.Path:
  """Loads RUN (or RUN/model), exports its predict function and writes the file `out` (module doc)."""
  from efficientad_jax.data import preprocess
  from efficientad_jax.serving import saved_model, thresholds

  model = saved_model.load(model_path)
  exported, leaves = export_predict(model, platforms)
  meta = {
    "format": FORMAT,
    "method": model.method.name,
    "image_size": list(model.image_size),  # [H, W]
    "threshold": model.threshold,
    "model_size": model.meta.get("model_size"),
    "mean": list(model.inputs.mean),
    "std": list(model.inputs.std),
    "outputs": list(OUTPUTS),
    "platforms": list(exported.platforms),
    "input": "float32 [b, H, W, 3] (H, W = image_size), ImageNet-normalised",
    "preprocessing": preprocess.describe(model.image_size),
    "output_size": list(model.image_size),
    "decision": "anomalous if score > threshold",
    "threshold_rule": model.meta.get("threshold_rule", ""),
    "validation_median": thresholds.median(model.validation_scores),
    "normalized_score": thresholds.NORMALIZED,
    "source": str(saved_model.model_dir(model_path)),
  }
  arrays = {"exported": _bytes(exported.serialize()), "meta": _bytes(json.dumps(meta).encode())}
  arrays.update({f"param_{i:05d}": leaf for i, leaf in enumerate(leaves)})
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # through a buffer: np.savez(path) would append '.npz' to the name
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(out)  # atomic: a reader never sees half a file
  return out


class ExportedModel:
  """A deserialised predict function with its arrays on the default device; call it on image batches."""

  def __init__(self, exported: jax.export.Exported, params: list[np.ndarray], meta: dict):
    self.exported = exported
    self.meta = meta
    self._params = [jax.device_put(p) for p in params]
    self._call = jax.jit(exported.call)  # compiles once per batch size

  @property
  def image_size(self) -> ImageSize:
    """(H, W); files written before rectangular sizes hold one int."""
    return ImageSize(self.meta["image_size"])

  @property
  def threshold(self) -> float:
    return float(self.meta["threshold"])

  def __call__(self, images: np.ndarray | jax.Array) -> dict[str, jax.Array]:
    """images [B, H, W, 3] float32, normalised -> the outputs dict of the model's predict (module doc)."""
    h, w = self.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (h, w, 3):
      raise ValueError(f"expected images of shape [B, {h}, {w}, 3], got {tuple(images.shape)}")
    return self._call(self._params, jax.numpy.asarray(images, np.float32))


def load_exported(path: str | pathlib.Path) -> ExportedModel:
  """Reads a file written by `export_model`; needs jax and numpy only."""
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as archive:
      meta = json.loads(archive["meta"].tobytes().decode())
      blob = bytearray(archive["exported"].tobytes())
      params = [archive[k] for k in sorted(archive.files) if k.startswith("param_")]
  except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:  # truncated or not an .npz
    raise ValueError(f"{path}: not an exported EfficientAD model ({type(e).__name__}: {e})") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r} is not supported (expected {FORMAT!r})")
  return ExportedModel(jax.export.deserialize(blob), params, meta)
