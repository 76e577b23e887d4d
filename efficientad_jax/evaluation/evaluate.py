"""Evaluation of a trained run on its test set (impure orchestration; docs/method.md §7 and §9).

`evaluate(RUN)` reads top to bottom: load RUN/model (any method, `saved_model.load`) -> test records -> the
model's jitted predict in fixed-size batches grouped by original image size -> full-resolution maps -> metrics. It
writes to
RUN/eval/:

  metrics.json                      everything `evaluate` returns
  results.md                        the results table of the category
  anomaly_maps/<category>/<id>.tiff float32 maps in the official layout, i.e.
                                    anomaly_maps/<category>/test/<defect>/<stem>.tiff, which the
                                    official MVTec AD / MVTec LOCO evaluation scripts read as they are
  roc.png, pr.png                   image-level curves
  overlays/<id>.png                 image | image + heatmap with the ground truth outlined (a sample)

Thresholds: the decision threshold saved with the model comes from validation normals (training,
docs/method.md §7.4); the F1-optimal threshold below is measured ON THE TEST SET, reported for comparison and
never written back into the model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tifffile
import tqdm

from efficientad_jax import metrics as metrics_lib
from efficientad_jax import pictures
from efficientad_jax.data import batches, make_datasets
from efficientad_jax.serving import saved_model
from efficientad_jax.training import lock

log = logging.getLogger("efficientad_jax")

EVAL_BATCH = 8  # images per predict call; every original size compiles once at this batch shape


# --- Prediction over the test records.


def predict_records(
  model: saved_model.LoadedModel,
  records: Sequence[dict],
  batch_size: int = EVAL_BATCH,
  keep_images: Iterable[int] = (),
  progress: bool = True,
) -> tuple[list[dict], list[np.ndarray], np.ndarray, dict[int, np.ndarray]]:
  """Runs the one predict path over eval records (`data.pipeline.eval_element` format).

  Returns:
    (records without their 'image', anomaly maps [H_i, W_i] float32 at the original sizes,
     scores [N] float32, {i: network input [S, S, 3]} for i in keep_images).
  """
  n, keep = len(records), set(keep_images)
  infos, maps, scores, kept = [None] * n, [None] * n, np.zeros(n, np.float32), {}

  def indexed():
    for i, record in enumerate(batches.ordered(records)):
      infos[i] = {k: v for k, v in record.items() if k != "image"}  # masks stay, images go
      if i in keep:
        kept[i] = record["image"]
      yield i, record

  with tqdm.tqdm(total=n, desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True) as bar:

    def run(images, size):
      out = model.predict_fn(model.detector, images, out_size=size)
      return {"anomaly_map": out["anomaly_map"], "score": out["score"]}

    for indices, out in batches.map_batches(run, batches.size_batches(indexed(), batch_size)):
      for j, i in enumerate(indices):
        maps[i], scores[i] = out["anomaly_map"][j], out["score"][j]
      bar.update(len(indices))
  return infos, maps, scores, kept


# --- Metrics.


def is_loco(records: Sequence[dict]) -> bool:
  return any(r["loco_type"] for r in records)


def decision_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
  """Image-level decisions: at the saved threshold (score > t, as `predict`) and at the test set's
  F1-optimal threshold (score >= t, as `metrics.f1_optimal` defines it; reported only)."""
  labels = np.asarray(labels) != 0
  saved = scores > threshold
  best = metrics_lib.f1_optimal(scores, labels)
  return {
    "saved_threshold": float(threshold),
    "accuracy_at_saved": float(np.mean(saved == labels)),
    "tpr_at_saved": float(np.mean(saved[labels])),
    "fpr_at_saved": float(np.mean(saved[~labels])),
    "f1_optimal_threshold": best["threshold"],
    "f1_at_optimal": best["f1"],
    "accuracy_at_f1_optimal": float(np.mean((scores >= best["threshold"]) == labels)),
  }


def compute_metrics(maps: Sequence[np.ndarray], records: Sequence[dict], scores: np.ndarray, threshold: float) -> dict:
  """LOCO layout: `mvtec_loco_metrics` (AU-sPRO, image AU-ROC per split); else `mvtec_ad_metrics`."""
  labels = np.asarray([r["label"] for r in records])
  if is_loco(records):
    channels = [[metrics_lib.DefectChannel(c["mask"], c["saturation_area"]) for c in r["channels"]] for r in records]
    result = metrics_lib.mvtec_loco_metrics(maps, channels, [r["loco_type"] for r in records])
  else:
    result = metrics_lib.mvtec_ad_metrics(maps, [r["mask"] for r in records], labels)
  return {
    "layout": "mvtec_loco" if is_loco(records) else "mvtec_ad",
    "num_images": len(records),
    "num_anomalous": int(np.count_nonzero(labels)),
    "metrics": result,
    "decision": decision_metrics(scores, labels, threshold),
  }


def _pct(value: float) -> str:
  return f"{100 * value:.2f}"


def results_table(m: dict) -> str:
  """The markdown results table of one evaluated category (values in %)."""
  res, dec, cat = m["metrics"], m["decision"], m["category"]
  acc = f"accuracy at the saved threshold {dec['saved_threshold']:.4g}: {_pct(dec['accuracy_at_saved'])} %"
  if m["layout"] == "mvtec_loco":
    limits = list(res["mean"]["au_spro"])
    head = "| object | split | image AU-ROC | " + " | ".join(f"AU-sPRO {l:g}" for l in limits) + " |"
    rows = [
      f"| {cat} | {s} | {_pct(res[s]['image_auroc'])} | "
      + " | ".join(_pct(res[s]["au_spro"][l]) for l in limits)
      + " |"
      for s in ("structural", "logical", "mean")
    ]
  else:
    limits = list(res["au_pro"])
    head = (
      "| category | image AU-ROC | pixel AU-ROC | "
      + " | ".join(f"AU-PRO {l:g}" for l in limits)
      + " | image F1 | pixel F1 |"
    )
    rows = [
      f"| {cat} | {_pct(res['image_auroc'])} | {_pct(res['pixel_auroc'])} | "
      + " | ".join(_pct(res["au_pro"][l]) for l in limits)
      + f" | {_pct(res['image_f1'])} | {_pct(res['pixel_f1'])} |"
    ]
  rule = "|" + "---|" * (head.count("|") - 1)
  return "\n".join(
    [f"### {cat} ({m['num_images']} test images, {m['num_anomalous']} anomalous)", "", head, rule, *rows, "", acc, ""]
  )


# --- Files.


def write_maps(maps: Sequence[np.ndarray], records: Sequence[dict], root: pathlib.Path) -> None:
  """root/<id>.tiff, float32 (ids are 'test/<defect>/<stem>': the official layout)."""
  for amap, record in zip(maps, records):
    path = root / f"{record['id']}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(amap, np.float32))


def overlay_indices(n: int, k: int) -> list[int]:
  """k indices spread evenly over the ordered test set (so every defect folder tends to appear)."""
  if k <= 0 or n == 0:
    return []
  return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def write_pictures(
  out: pathlib.Path,
  m: dict,
  records: Sequence[dict],
  maps: Sequence[np.ndarray],
  scores: np.ndarray,
  inputs: dict[int, np.ndarray],
  cfg: Any,
) -> None:
  """Overlays of the kept images and the image-level ROC / PR curves."""
  vmax = 2.0 * m["decision"]["saved_threshold"]
  for i, x in inputs.items():
    rgb = pictures.resize_rgb(pictures.denormalize(x, cfg.data.mean, cfg.data.std), maps[i].shape)
    panel = pictures.overlay(rgb, maps[i], 0.0, vmax, mask=records[i]["mask"])
    pictures.save_png(pictures.side_by_side(rgb, panel), out / "overlays" / f"{records[i]['id']}.png")
  labels = np.asarray([r["label"] for r in records]) != 0
  subsets = {"all": (scores, labels)}
  if m["layout"] == "mvtec_loco":
    kind = np.asarray([r["loco_type"] for r in records])
    subsets = {
      s: (scores[(kind == "good") | (kind == f"{s}_anomalies")], labels[(kind == "good") | (kind == f"{s}_anomalies")])
      for s in ("structural", "logical")
    }
  subsets = {k: v for k, v in subsets.items() if 0 < v[1].sum() < len(v[1])}  # both classes present
  try:
    pictures.plot_curves(subsets, m["category"], out / "roc.png", out / "pr.png")
  except ImportError:
    log.warning("matplotlib is not installed: no roc.png / pr.png (pip install matplotlib)")


def _jsonable(tree: Any) -> Any:
  """Float dict keys (integration limits) -> strings; NumPy scalars -> Python numbers."""
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  return tree.item() if isinstance(tree, np.generic) else tree


# --- The evaluation.


def evaluate(
  workdir: str | pathlib.Path,
  *,
  cfg: Any = None,
  out_dir: str | pathlib.Path | None = None,
  max_overlays: int = 8,
  batch_size: int = EVAL_BATCH,
  progress: bool = True,
) -> dict:
  """Evaluates RUN/model on the test set of its dataset and writes RUN/eval (module doc).

  Args:
    workdir: the run directory (holding model/) or a model folder.
    cfg: dataset to evaluate on, a config of the model's method: its `data` section and seed are used (e.g.
      another root); default: the config saved in the model. Networks and map settings always come from
      the model.
    out_dir: default RUN/eval.
    max_overlays: number of overlay pictures.
    batch_size: images per predict call.
  Returns:
    {'dataset', 'category', 'layout', 'num_images', 'num_anomalous', 'model': {...},
     'metrics': `mvtec_ad_metrics` or `mvtec_loco_metrics` result, 'decision': `decision_metrics`}.
  """
  workdir = pathlib.Path(workdir).absolute()
  folder = saved_model.model_dir(workdir)
  run = folder.parent if (folder / "meta").exists() else workdir  # no model yet: RUN itself
  # One process per run directory: refused while a training (or another evaluation) holds it.
  with lock.hold(run if out_dir is None else pathlib.Path(out_dir), "evaluation"):
    return _evaluate(workdir, folder, cfg, out_dir, max_overlays, batch_size, progress)


def _evaluate(workdir, folder, cfg, out_dir, max_overlays, batch_size, progress) -> dict:
  model = saved_model.load(workdir)
  from efficientad_jax.training.engine import resolve_paths

  cfg = resolve_paths(cfg or model.cfg, folder.parent)  # synthetic data: RUN/data
  out = pathlib.Path(out_dir) if out_dir is not None else folder.parent / "eval"
  ds = make_datasets(cfg.data, image_size=model.image_size, seed=model.method.inputs(cfg).seed)
  category = ds.info.category or "default"

  # --- Maps of every test image, at the original resolution.
  keep = overlay_indices(len(ds.test), max_overlays)
  records, maps, scores, inputs = predict_records(model, ds.test, batch_size, keep, progress)

  # --- Metrics.
  m = {
    "dataset": ds.info.dataset,
    "category": category,
    "model": {
      "path": str(folder),
      "size": model.meta.get("model_size"),
      "image_size": model.image_size,
      "teacher": model.meta.get("teacher"),
      "steps": model.meta.get("steps"),
    },
    **compute_metrics(maps, records, scores, model.threshold),
  }

  # --- Files. Maps and overlays of an earlier evaluation go first: a stale TIFF would be read by the
  # official scripts as if it belonged to this one.
  for stale in (out / "anomaly_maps" / category, out / "overlays"):
    shutil.rmtree(stale, ignore_errors=True)
  out.mkdir(parents=True, exist_ok=True)
  write_maps(maps, records, out / "anomaly_maps" / category)
  (out / "metrics.json").write_text(json.dumps(_jsonable(m), indent=2) + "\n")
  (out / "results.md").write_text(results_table(m))
  write_pictures(out, m, records, maps, scores, inputs, cfg)
  log.info("evaluation written to %s", out)
  return m
