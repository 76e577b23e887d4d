"""Predicting on image files of any size with a saved model of any method (docs/method.md §7).

Every prediction goes through the model's own predict function (`saved_model.Method.predict`; for EfficientAD
`inference.predict`, the one inference path), jitted once per config and compiled once per output size and
batch shape. `load`, `model_dir` and `LoadedModel` are `saved_model`'s, named here for the callers' ease:

  model = load("runs/widget")                      # RUN or RUN/model, either method
  result = predict_file(model, "part.png")         # score, decision, full-resolution map
  results, failures = predict_paths(model, list_images("images/*.png"), out_dir="pred")
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tifffile

from efficientad_jax import pictures, report
from efficientad_jax.data import DataError, preprocess
from efficientad_jax.serving import backends, thresholds
from efficientad_jax.serving.saved_model import LoadedModel, load, model_dir  # noqa: F401  (predict.load: CLIs, notebooks)

# --- Single images.


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's result: score = max of anomaly_map [H, W] (original size); anomalous = score > threshold."""

  name: str
  score: float
  anomalous: bool
  anomaly_map: np.ndarray
  rgb: np.ndarray  # [H, W, 3] uint8, the decoded input (for overlays)
  threshold: float  # the one the decision used
  # 0 at the validation normals' median score, 0.5 at the threshold (`thresholds.normalized`; NaN for models
  # saved without validation scores)
  normalized_score: float


def prepare(
  source: preprocess.ImageSource, image_size: int, mean: Sequence[float], std: Sequence[float], name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
  """Image file/bytes/array -> (network input [S, S, 3] float32, decoded RGB [H, W, 3] uint8).

  The same decode -> resize -> normalise as the evaluation records (grayscale and RGBA handled by
  `preprocess.decode_image`); raises `DataError` naming the file when it cannot be read.
  """
  rgb = preprocess.decode_image(source, name)
  x = preprocess.model_input(rgb, image_size, mean, std)
  return x, rgb


def predict_image(
  model: LoadedModel,
  source: preprocess.ImageSource,
  name: str = "",
  threshold: float | None = None,
  backend: str | backends.Runner = "jax",
) -> Prediction:
  """Predicts one image of any size; its map comes back at the image's own size.

  Args:
    threshold: the decision threshold; default the model's saved one (`thresholds.choose` picks others).
    backend: what runs the model (`backends.BACKENDS`), or a `backends.make` runner to reuse across calls.
  """
  threshold = model.threshold if threshold is None else float(threshold)
  runner = backends.resolve(model, backend)
  x, rgb = prepare(source, model.image_size, model.inputs.mean, model.inputs.std, name)
  out = runner(x[None], out_size=rgb.shape[:2])
  score = float(out["score"][0])
  return Prediction(
    name=name or str(source),
    score=score,
    anomalous=score > threshold,
    anomaly_map=np.asarray(out["anomaly_map"][0]),
    rgb=rgb,
    threshold=threshold,
    normalized_score=thresholds.normalized(score, thresholds.median(model.validation_scores), threshold),
  )


def predict_file(
  model: LoadedModel, path: str | pathlib.Path, threshold: float | None = None, backend: str | backends.Runner = "jax"
) -> Prediction:
  return predict_image(model, pathlib.Path(path), str(path), threshold, backend)


# --- Many files (the predict CLI).


def list_images(spec: str | pathlib.Path) -> list[pathlib.Path]:
  """A folder (its files, sorted, hidden ones skipped), a glob pattern or one file -> file paths.

  Every file is returned, images or not: non-images are rejected one by one, with their name, by
  `predict_paths`, rather than silently skipped.
  """
  path = pathlib.Path(spec)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
      raise FileNotFoundError(
        f"no image files in the folder {spec} (--images; subfolders are not searched): "
        f"pass a quoted glob such as '{path / '**' / '*.png'}'"
      )
    return files
  if path.is_file():
    return [path]
  matches = sorted(pathlib.Path(p) for p in glob.glob(str(spec), recursive=True))
  files = [p for p in matches if p.is_file()]
  if not files:
    raise FileNotFoundError(f"{spec}: no such file or folder, and no files match it as a glob pattern")
  return files


def _unique_stem(path: pathlib.Path, used: set[str]) -> str:
  stem, k = path.stem, 1
  while stem in used:  # same file name in two folders of a glob: keep both outputs
    stem, k = f"{path.stem}-{k}", k + 1
  used.add(stem)
  return stem


def write_outputs(result: Prediction, out_dir: pathlib.Path, stem: str, display_max: float) -> report.Item:
  """<out>/<stem>.tiff (float32 map, original size), <out>/<stem>_overlay.png and the report's thumbnail.

  Returns the image's entry in the report (its group: the folder the file lies in)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(out_dir / f"{stem}.tiff", result.anomaly_map.astype(np.float32))
  overlay = pictures.overlay(result.rgb, result.anomaly_map, 0.0, display_max)
  pictures.save_png(overlay, out_dir / f"{stem}_overlay.png")
  thumb, size = report.write_thumbnail(overlay, out_dir / report.FILES, stem)
  group = pathlib.Path(result.name).parent.name
  return report.Item(
    result.name,
    result.score,
    result.anomalous,
    result.normalized_score,
    group,
    None,
    f"{stem}_overlay.png",
    thumb,
    size,
  )


def write_report(
  out_dir: pathlib.Path, items: Sequence[report.Item], model: LoadedModel, threshold: float, threshold_rule: str
) -> pathlib.Path:
  """<out>/report.html: the score distribution with the threshold drawn in, and every image's overlay."""
  flagged = sum(it.anomalous for it in items)
  facts = [
    (
      "model",
      f"{model.method.name}, {model.meta.get('model_size')}, {model.image_size} px, {model.meta.get('steps')} steps",
    ),
    ("images", f"{len(items)} predicted, {flagged} flagged anomalous"),
  ]
  return report.write(out_dir / "report.html", "predictions", items, threshold, threshold_rule, facts=facts)


def predict_paths(
  model: LoadedModel,
  paths: Sequence[pathlib.Path],
  out_dir: str | pathlib.Path | None = None,
  on_result: Callable[[Prediction], Any] | None = None,
  threshold: float | None = None,
  backend: str | backends.Runner = "jax",
  threshold_rule: str = "saved with the model (validation normals)",
) -> tuple[list[Prediction], list[tuple[str, str]]]:
  """Predicts each file; unreadable ones are collected as (path, reason) and the others go on.

  Args:
    paths: image files (any size, gray/RGB/RGBA).
    out_dir: if given, writes each map (TIFF) and overlay (PNG), predictions.csv and report.html (with its
      thumbnails in report_files/).
    on_result: called with each Prediction as soon as it exists (e.g. to print it).
    threshold: the decision threshold; default the model's saved one.
    threshold_rule: how the threshold was chosen, for the report.
    backend: what runs the model (`backends.BACKENDS`; one runner serves every file), or a `backends.make` runner.
  Returns:
    (predictions, failures).
  """
  runner = backends.resolve(model, backend)
  out = pathlib.Path(out_dir) if out_dir is not None else None
  results, failures, used, items = [], [], set(), []
  rows = [("file", "score", "anomalous", "normalized_score")]
  for path in paths:
    try:
      result = predict_file(model, path, threshold, runner)
    except DataError as e:
      failures.append((str(path), str(e)))
      continue
    results.append(result)
    if on_result is not None:
      on_result(result)
    if out is not None:
      items.append(write_outputs(result, out, _unique_stem(path, used), display_max=2.0 * result.threshold))
      rows.append((str(path), f"{result.score:.6g}", int(result.anomalous), f"{result.normalized_score:.4f}"))
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as f:
      csv.writer(f).writerows(rows)  # quotes paths that hold commas
    if items:
      write_report(out, items, model, results[0].threshold, threshold_rule)
  return results, failures
