"""Evaluation of a trained run on its test set (impure orchestration; docs/method.md §7 and §9).

`evaluate(RUN)` reads top to bottom: load RUN/model (any method, `saved_model.load`) -> test records -> the
model's jitted predict in fixed-size batches grouped by original image size -> full-resolution maps -> metrics. It
writes to RUN/eval/:

  metrics.json                      everything `evaluate` returns
  results.md                        the results table of the category
  scores.csv                        per test image: id, defect, label, score, decision, normalised score
  anomaly_maps/<category>/<id>.tiff float32 maps in the official layout, i.e.
                                    anomaly_maps/<category>/test/<defect>/<stem>.tiff, which the
                                    official MVTec AD / MVTec LOCO evaluation scripts read as they are
  roc.png, pr.png                   image-level curves (when matplotlib is installed)
  report.html, report_files/        the page to review the run (`efficientad_jax.report`): metrics, curves,
                                    score distribution, every test image's overlay with its ground truth

Thresholds: the decisions (accuracy, true- and false-positive rates, the report's outcomes) are taken at the
threshold saved with the model, which comes from validation normals (docs/method.md §7.4), unless the caller
chooses one: a number, a false-positive rate on the validation normals (`serving.thresholds.choose`), or the
test set's F1-optimal point (`threshold="f1"`: it uses the test labels, and the results say so). The F1-optimal
figures are reported beside the others in every case, and nothing is ever written back into the model.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
import tqdm

from efficientad_jax import metrics as metrics_lib
from efficientad_jax import pictures
from efficientad_jax import report as report_lib
from efficientad_jax.data import batches, make_datasets
from efficientad_jax.serving import saved_model, thresholds
from efficientad_jax.training import lock

log = logging.getLogger("efficientad_jax")

EVAL_BATCH = 8  # images per predict call; every original size compiles once at this batch shape


# --- Prediction over the test records.


def predict_records(
  model: saved_model.LoadedModel,
  records: Sequence[dict],
  batch_size: int = EVAL_BATCH,
  progress: bool = True,
) -> tuple[list[dict], list[np.ndarray], np.ndarray, list[np.ndarray]]:
  """Runs the one predict path over eval records (`data.pipeline.eval_element` format).

  Returns:
    (records without their 'image', anomaly maps [H_i, W_i] float32 at the original sizes,
     scores [N] float32, the network inputs as pictures [S, S, 3] uint8 for the report).
  """
  n = len(records)
  infos, maps, scores, pictures_ = [None] * n, [None] * n, np.zeros(n, np.float32), [None] * n

  def indexed():
    for i, record in enumerate(batches.ordered(records)):
      infos[i] = {k: v for k, v in record.items() if k != "image"}  # masks stay, images go (as uint8)
      pictures_[i] = pictures.denormalize(record["image"], model.inputs.mean, model.inputs.std)
      yield i, record

  with tqdm.tqdm(total=n, desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True) as bar:

    def run(images, size):
      out = model.predict_fn(model.detector, images, out_size=size)
      return {"anomaly_map": out["anomaly_map"], "score": out["score"]}

    for indices, out in batches.map_batches(run, batches.size_batches(indexed(), batch_size)):
      for j, i in enumerate(indices):
        maps[i], scores[i] = out["anomaly_map"][j], out["score"][j]
      bar.update(len(indices))
  return infos, maps, scores, pictures_


# --- Metrics.


def is_loco(records: Sequence[dict]) -> bool:
  return any(r["loco_type"] for r in records)


def decision_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, rule: str, saved: float) -> dict:
  """Image-level decisions at `threshold` (score > t, as `predict`; chosen by `rule`) and at the test set's
  F1-optimal threshold (score >= t, as `metrics.f1_optimal` defines it; reported for comparison).
  Rates over an empty class are NaN."""
  labels = np.asarray(labels) != 0
  decided = np.asarray(scores) > threshold
  rate = lambda hits: float(np.mean(hits)) if len(hits) else float("nan")
  best = metrics_lib.f1_optimal(scores, labels)
  return {
    "threshold": float(threshold),
    "threshold_rule": rule,
    "saved_threshold": float(saved),
    "accuracy_at_threshold": float(np.mean(decided == labels)),
    "tpr_at_threshold": rate(decided[labels]),
    "fpr_at_threshold": rate(decided[~labels]),
    "f1_optimal_threshold": best["threshold"],
    "f1_at_optimal": best["f1"],
    "accuracy_at_f1_optimal": float(np.mean((scores >= best["threshold"]) == labels)),
  }


def choose_threshold(
  model: saved_model.LoadedModel,
  scores: np.ndarray,
  labels: np.ndarray,
  threshold: float | str | None,
  fpr: float | None,
) -> tuple[float, str]:
  """(threshold, rule): `thresholds.choose` (a number, a false-positive rate on validation normals, or the saved
  one), or 'f1': the test set's F1-optimal point, as a 'score > t' threshold (the float just below it)."""
  if threshold == "f1":
    if fpr is not None:
      raise thresholds.ThresholdError("give --threshold or --fpr, not both")
    labels = np.asarray(labels) != 0
    if labels.all() or not labels.any():
      raise thresholds.ThresholdError("--threshold f1 needs both normal and anomalous test images")
    best = metrics_lib.f1_optimal(scores, labels)["threshold"]
    return float(np.nextafter(np.float32(best), np.float32(-np.inf))), "F1-optimal on the test set (uses its labels)"
  number = None if threshold is None else float(threshold)
  return thresholds.choose(model.threshold, model.validation_scores, threshold=number, fpr=fpr)


def compute_metrics(
  maps: Sequence[np.ndarray],
  records: Sequence[dict],
  scores: np.ndarray,
  threshold: float,
  rule: str = "saved with the model (validation normals)",
  saved: float | None = None,
) -> dict:
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
    "decision": decision_metrics(scores, labels, threshold, rule, threshold if saved is None else saved),
  }


def _pct(value: float) -> str:
  return f"{100 * value:.2f}"


def results_rows(m: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the results table of one evaluated category (values in %): markdown and the report."""
  res, cat = m["metrics"], m["category"]
  if m["layout"] == "mvtec_loco":
    limits = list(res["mean"]["au_spro"])
    header = ["object", "split", "image AU-ROC", *(f"AU-sPRO {l:g}" for l in limits)]
    rows = [
      [cat, s, _pct(res[s]["image_auroc"]), *(_pct(res[s]["au_spro"][l]) for l in limits)]
      for s in ("structural", "logical", "mean")
    ]
  else:
    limits = list(res["au_pro"])
    header = ["category", "image AU-ROC", "pixel AU-ROC", *(f"AU-PRO {l:g}" for l in limits), "image F1", "pixel F1"]
    rows = [
      [
        cat,
        _pct(res["image_auroc"]),
        _pct(res["pixel_auroc"]),
        *(_pct(res["au_pro"][l]) for l in limits),
        _pct(res["image_f1"]),
        _pct(res["pixel_f1"]),
      ]
    ]
  return header, rows


def decision_rows(dec: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows): the decisions at the threshold in use and at the test set's F1-optimal one (values in %)."""
  header = ["threshold", "chosen by", "accuracy", "true-positive rate", "false-positive rate"]
  rows = [
    [
      f"{dec['threshold']:.4g}",
      dec["threshold_rule"],
      _pct(dec["accuracy_at_threshold"]),
      _pct(dec["tpr_at_threshold"]),
      _pct(dec["fpr_at_threshold"]),
    ],
    [f"{dec['f1_optimal_threshold']:.4g}", "F1-optimal on the test set", _pct(dec["accuracy_at_f1_optimal"]), "", ""],
  ]
  return header, rows


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return [
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(row) + " |" for row in rows),
  ]


def results_table(m: dict) -> str:
  """The markdown results of one evaluated category: the metrics table and the decisions (values in %)."""
  head = f"### {m['category']} ({m['num_images']} test images, {m['num_anomalous']} anomalous)"
  return "\n".join([head, "", *_markdown(*results_rows(m)), "", *_markdown(*decision_rows(m["decision"])), ""])


# --- Files.


def write_maps(maps: Sequence[np.ndarray], records: Sequence[dict], root: pathlib.Path) -> None:
  """root/<id>.tiff, float32 (ids are 'test/<defect>/<stem>': the official layout)."""
  for amap, record in zip(maps, records):
    path = root / f"{record['id']}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.asarray(amap, np.float32))


def write_scores(path: pathlib.Path, records: Sequence[dict], scores: np.ndarray, m: dict, normalized) -> None:
  """scores.csv: one row per test image, in the test set's order."""
  rows = [("id", "defect", "label", "score", "anomalous", "normalized_score")]
  for r, score, z in zip(records, scores, normalized):
    rows.append(
      (r["id"], r["defect"], int(r["label"] != 0), f"{score:.6g}", int(score > m["decision"]["threshold"]), f"{z:.4f}")
    )
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)


def curve_subsets(m: dict, records: Sequence[dict], scores: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (scores, labels)} for the image-level curves: all images, or LOCO's two splits (with its normals)."""
  labels = np.asarray([r["label"] for r in records]) != 0
  subsets = {"all": (scores, labels)}
  if m["layout"] == "mvtec_loco":
    kind = np.asarray([r["loco_type"] for r in records])
    subsets = {
      s: (scores[(kind == "good") | (kind == f"{s}_anomalies")], labels[(kind == "good") | (kind == f"{s}_anomalies")])
      for s in ("structural", "logical")
    }
  return {k: v for k, v in subsets.items() if 0 < v[1].sum() < len(v[1])}  # both classes present


def write_report(
  out: pathlib.Path,
  m: dict,
  records: Sequence[dict],
  maps: Sequence[np.ndarray],
  scores: np.ndarray,
  images: Sequence[np.ndarray],
  normalized: np.ndarray,
  progress: bool = True,
) -> pathlib.Path:
  """report.html and its pictures (every test image: full-size overlay with its ground truth, thumbnail)."""
  threshold = m["decision"]["threshold"]
  vmax = 2.0 * threshold  # the threshold mid-scale (pictures module doc)

  def one(i: int) -> report_lib.Item:
    r = records[i]
    rgb = pictures.resize_rgb(images[i], maps[i].shape)
    panel = pictures.overlay(rgb, maps[i], 0.0, vmax, mask=r["mask"])
    full, thumb, size = report_lib.write_pictures(rgb, panel, out / report_lib.FILES, r["id"])
    label = r["label"] != 0
    return report_lib.Item(
      r["id"],
      float(scores[i]),
      bool(scores[i] > threshold),
      float(normalized[i]),
      r["defect"],
      label,
      full,
      thumb,
      size,
    )

  # JPEG encoding and resizing release the GIL: a few threads write the pictures of a large test set faster.
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    items = list(
      tqdm.tqdm(
        pool.map(one, range(len(records))),
        total=len(records),
        desc="report",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
      )
    )
  model = m["model"]
  facts = [
    (
      "model",
      f"{model['path']} ({model['size']}, {model['image_size']} px, {model['steps']} steps, "
      f"teacher {model['teacher']})",
    ),
    ("data", f"{m['dataset']} / {m['category']}: {m['num_images']} test images, {m['num_anomalous']} anomalous"),
  ]
  tables = [
    report_lib.Table("metrics (%)", *results_rows(m)),
    report_lib.Table("decisions (%)", *decision_rows(m["decision"])),
  ]
  return report_lib.write(
    out / "report.html",
    f"{m['category']}: evaluation",
    items,
    threshold,
    m["decision"]["threshold_rule"],
    tables=tables,
    facts=facts,
    curves=curve_subsets(m, records, scores),
    saved_threshold=m["decision"]["saved_threshold"],
  )


def write_curves(out: pathlib.Path, m: dict, records: Sequence[dict], scores: np.ndarray) -> None:
  """roc.png and pr.png (matplotlib; skipped with a warning when it is not installed)."""
  try:
    pictures.plot_curves(curve_subsets(m, records, scores), m["category"], out / "roc.png", out / "pr.png")
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
  threshold: float | str | None = None,
  fpr: float | None = None,
  report: bool = True,
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
    threshold: the decisions' threshold: a number, 'f1' (the test set's F1-optimal point), or None (the
      saved one, unless `fpr` is given).
    fpr: a false-positive rate on the validation normals to choose the threshold by.
    report: write report.html and its pictures.
    batch_size: images per predict call.
  Returns:
    {'dataset', 'category', 'layout', 'num_images', 'num_anomalous', 'model': {...},
     'metrics': `mvtec_ad_metrics` or `mvtec_loco_metrics` result, 'decision': `decision_metrics`}.
  Raises:
    thresholds.ThresholdError: a threshold that cannot be chosen as asked (before anything is predicted, except
      for 'f1' on a test set without both classes).
  """
  workdir = pathlib.Path(workdir).absolute()
  folder = saved_model.model_dir(workdir)
  run = folder.parent if (folder / "meta").exists() else workdir  # no model yet: RUN itself
  if threshold is not None and threshold != "f1" and not isinstance(threshold, (int, float)):
    raise thresholds.ThresholdError(f"--threshold {threshold!r}: give a number or 'f1'")
  # One process per run directory: refused while a training (or another evaluation) holds it.
  with lock.hold(run if out_dir is None else pathlib.Path(out_dir), "evaluation"):
    return _evaluate(workdir, folder, cfg, out_dir, threshold, fpr, report, batch_size, progress)


def _evaluate(workdir, folder, cfg, out_dir, threshold, fpr, with_report, batch_size, progress) -> dict:
  model = saved_model.load(workdir)
  # Chosen before minutes of prediction (a bad --fpr fails here); only 'f1' needs the test scores.
  decided = None if threshold == "f1" else choose_threshold(model, np.zeros(0), np.zeros(0), threshold, fpr)
  from efficientad_jax.training.engine import resolve_paths

  cfg = resolve_paths(cfg or model.cfg, folder.parent)  # synthetic data: RUN/data
  out = pathlib.Path(out_dir) if out_dir is not None else folder.parent / "eval"
  ds = make_datasets(cfg.data, image_size=model.image_size, seed=model.method.inputs(cfg).seed)
  category = ds.info.category or "default"

  # --- Maps of every test image, at the original resolution.
  records, maps, scores, images = predict_records(model, ds.test, batch_size, progress)

  # --- Metrics, with the decisions at the chosen threshold.
  labels = np.asarray([r["label"] for r in records])
  chosen, rule = decided or choose_threshold(model, scores, labels, threshold, fpr)
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
    **compute_metrics(maps, records, scores, chosen, rule, model.threshold),
  }
  normalized = thresholds.normalized(scores, thresholds.median(model.validation_scores), chosen)

  # --- Files. Maps and pictures of an earlier evaluation go first: a stale TIFF would be read by the
  # official scripts as if it belonged to this one, a stale picture shown as if it did.
  for stale in (out / "anomaly_maps" / category, out / report_lib.FILES, out / "report.html"):
    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  write_maps(maps, records, out / "anomaly_maps" / category)
  (out / "metrics.json").write_text(json.dumps(_jsonable(m), indent=2) + "\n")
  (out / "results.md").write_text(results_table(m))
  write_scores(out / "scores.csv", records, scores, m, normalized)
  write_curves(out, m, records, scores)
  if with_report:
    write_report(out, m, records, maps, scores, images, normalized, progress)
  log.info("evaluation written to %s", out)
  return m
