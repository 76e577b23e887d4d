"""evaluate: end to end on tiny untrained models (both layouts), checked against independent paths.

The maps are compared with the in-process predict function, and the metrics with the metrics functions
fed from the TIFF files and from ground truth read straight from the dataset folders (not the data
pipeline's records). `make_run` is shared with test_predict_export.py.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from efficientad_jax import config as config_lib
from efficientad_jax import metrics, models
from efficientad_jax.config import Config, DataConfig, ModelConfig
from efficientad_jax.data import batches, generate_synthetic, make_datasets
from efficientad_jax.efficientad import inference, normalization
from efficientad_jax.evaluation import evaluate
from efficientad_jax.serving import predict, saved_model
from tests.conftest import count_compiles

SIZE = 64
B = 6  # not a divisor of the 8 (MVTec AD) and 16 (LOCO) test images: the last batch is padded


def random_params(nets: models.Models, seed: int) -> dict:
  """Random params in the structure of `models.init_params` (its shapes via eval_shape), uniform
  +-1/sqrt(fan_in) like PyTorch's default, from a NumPy seed."""
  shapes = jax.eval_shape(lambda k: models.init_params(nets, k, SIZE), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 64
    return rng.uniform(-1, 1, s.shape).astype(np.float32) / np.sqrt(fan_in)

  return jax.tree_util.tree_map(draw, shapes)


def padded(images: np.ndarray) -> np.ndarray:
  return np.concatenate([images, np.repeat(images[-1:], B - len(images), axis=0)])


def make_run(root: pathlib.Path, layout: str) -> pathlib.Path:
  """A saved, untrained model on a synthetic dataset in `layout`; returns the run folder.

  Map quantiles and threshold are calibrated by training's own calibration, which runs the jitted predict
  of `saved_model.load` at evaluation's batch shape, so the whole module compiles predict once.
  """
  generate_synthetic(root / "data", layout=layout, size=SIZE, num_train=4, num_test=2, num_validation=2)
  cfg = Config(
    model=ModelConfig(image_size=SIZE), data=DataConfig(dataset=layout, root=str(root / "data"), category="widget")
  )
  nets = models.build(cfg.model)
  stats = normalization.TeacherStats.identity(cfg.model.teacher_channels)
  ds = make_datasets(cfg.data, SIZE, seed=0)
  detector, threshold, validation_scores = inference.calibrate(
    cfg, random_params(nets, seed=0), stats, ds.validation, B
  )
  meta = {
    "config": config_lib.to_dict(cfg),
    "threshold": threshold,
    "threshold_rule": f"{cfg.maps.threshold_quantile} quantile of validation image scores",
    "validation_scores": validation_scores,
    "image_size": SIZE,
    "model_size": "small",
    "teacher": "random",
    "steps": 0,
  }
  saved_model.save(root / "run" / "model", "efficientad", detector, meta)
  return root / "run"


def evaluated(tmp_path_factory, layout: str):
  """(run, metrics). Evaluation compiles nothing new here: all test images have one size, and its
  padded batches have the shape the calibration in make_run already compiled (one compile per size)."""
  run = make_run(tmp_path_factory.mktemp(layout), layout)
  with count_compiles() as compiled:
    m = evaluate.evaluate(run, batch_size=B, progress=False)
  assert not compiled, "evaluate compiled predict again for an already compiled size"
  return run, m


@pytest.fixture(scope="module")
def ad(tmp_path_factory):
  return evaluated(tmp_path_factory, "mvtec_ad")


@pytest.fixture(scope="module")
def loco(tmp_path_factory):
  return evaluated(tmp_path_factory, "mvtec_loco")


def dataset_dir(run: pathlib.Path) -> pathlib.Path:
  return run.parent / "data" / "widget"


def test_files_in_official_layout(ad, loco):
  for run, m in (ad, loco):
    out = run / "eval"
    for name in ("metrics.json", "results.md", "roc.png", "pr.png", "report.html", "scores.csv"):
      assert (out / name).is_file(), name
    images = sorted(
      p.relative_to(dataset_dir(run)).with_suffix(".tiff") for p in (dataset_dir(run) / "test").rglob("*.png")
    )
    maps = sorted(
      p.relative_to(out / "anomaly_maps" / "widget") for p in (out / "anomaly_maps" / "widget").rglob("*.tiff")
    )
    assert maps == images and len(maps) == m["num_images"]  # test/<defect>/<stem>.tiff, one per image
    # The report shows every test image: one full-size overlay and one thumbnail each, named by its id.
    for kind in ("full", "thumbs"):
      pictures = sorted(p.relative_to(out / "report_files" / kind) for p in (out / "report_files" / kind).rglob("*"))
      assert [p.with_suffix(".tiff") for p in pictures if p.suffix == ".jpg"] == maps
    assert set(m) == {"dataset", "category", "model", "layout", "num_images", "num_anomalous", "metrics", "decision"}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(evaluate._jsonable(m)))
    assert "| widget |" in (out / "results.md").read_text()
  assert ad[1]["layout"] == "mvtec_ad" and loco[1]["layout"] == "mvtec_loco"
  assert set(ad[1]["metrics"]["au_pro"]) == set(metrics.PRO_LIMITS)
  assert set(loco[1]["metrics"]) == {"structural", "logical", "mean"}
  assert set(loco[1]["metrics"]["mean"]["au_spro"]) == set(metrics.SPRO_LIMITS)


def read_maps(run: pathlib.Path, ids) -> list[np.ndarray]:
  return [tifffile.imread(run / "eval" / "anomaly_maps" / "widget" / f"{i}.tiff") for i in ids]


@pytest.mark.parametrize("layout", ["ad", "loco"])
def test_tiff_maps_equal_in_process_predict(layout, request):
  run, _ = request.getfixturevalue(layout)
  model = predict.load(run)
  records = list(make_datasets(model.cfg.data, SIZE, seed=0).test)
  for start in range(0, len(records), B):
    chunk = records[start : start + B]
    out = model.predict_fn(model.detector, padded(np.stack([r["image"] for r in chunk])), out_size=(SIZE, SIZE))
    tiffs = read_maps(run, [r["id"] for r in chunk])
    for k, tiff in enumerate(tiffs):
      assert tiff.dtype == np.float32 and tiff.shape == (SIZE, SIZE)
      np.testing.assert_array_equal(tiff, np.asarray(out["anomaly_map"][k]))


def test_ad_metrics_equal_direct_computation(ad):
  run, m = ad
  base = dataset_dir(run)
  images = sorted((base / "test").rglob("*.png"))
  ids = [str(p.relative_to(base).with_suffix("")) for p in images]
  maps = read_maps(run, ids)
  masks, labels = [], []
  for p in images:
    defect = p.parent.name
    labels.append(int(defect != "good"))
    gt = base / "ground_truth" / defect / f"{p.stem}_mask.png"
    masks.append(np.asarray(Image.open(gt)) > 0 if defect != "good" else np.zeros((SIZE, SIZE), bool))
  assert m["metrics"] == metrics.mvtec_ad_metrics(maps, masks, labels)
  scores, labels = np.array([x.max() for x in maps]), np.array(labels)
  threshold = m["decision"]["saved_threshold"]
  assert m["decision"]["threshold"] == threshold  # no threshold chosen: the saved one
  assert m["decision"]["accuracy_at_threshold"] == pytest.approx(np.mean((scores > threshold) == labels))
  assert m["decision"]["f1_optimal_threshold"] == pytest.approx(m["metrics"]["image_threshold"])
  assert threshold == saved_model.read(run / "model")[1]["threshold"]  # never overwritten


def test_loco_metrics_equal_direct_computation(loco):
  run, m = loco
  base = dataset_dir(run)
  config = json.loads((base / "defects_config.json").read_text())
  images = sorted((base / "test").rglob("*.png"))
  maps = read_maps(run, [str(p.relative_to(base).with_suffix("")) for p in images])
  splits = [p.parent.name for p in images]
  channels = [
    [
      metrics.channel_from_gt(gt, config)[0]
      for gt in sorted((base / "ground_truth" / p.parent.name / p.stem).glob("*.png"))
    ]
    for p in images
  ]
  assert m["metrics"] == metrics.mvtec_loco_metrics(maps, channels, splits)
  labels = np.array([s != "good" for s in splits])
  assert m["num_anomalous"] == labels.sum() == 14


def test_size_batches_groups_sizes_and_pads():
  sizes = [(4, 6), (5, 5), (4, 6), (4, 6), (5, 5), (4, 6), (4, 6)]
  records = [(i, {"orig_size": np.array(s), "image": np.full((2, 2, 3), i, np.float32)}) for i, s in enumerate(sizes)]
  grouped = list(batches.size_batches(records, 3))
  assert sorted(i for _, idx, _ in grouped for i in idx) == list(range(len(sizes)))
  for size, idx, images in grouped:
    assert images.shape == (3, 2, 2, 3)  # always full: one compile per size
    assert all(sizes[i] == size for i in idx)
    np.testing.assert_array_equal(images[: len(idx), 0, 0, 0], idx)
    np.testing.assert_array_equal(images[len(idx) :, 0, 0, 0], idx[-1])  # padded with the last image
  assert [len(idx) for _, idx, _ in grouped] == [3, 2, 2]


def test_decision_metrics_by_hand():
  scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
  d = evaluate.decision_metrics(scores, labels, threshold=0.35, rule="given", saved=0.2)
  assert d["accuracy_at_threshold"] == 0.5  # 0.35 is not > 0.35
  assert (d["tpr_at_threshold"], d["fpr_at_threshold"]) == (0.5, 0.5)
  assert (d["threshold"], d["threshold_rule"], d["saved_threshold"]) == (0.35, "given", 0.2)
  assert d["f1_optimal_threshold"] == 0.35 and d["f1_at_optimal"] == pytest.approx(0.8)
  assert d["accuracy_at_f1_optimal"] == 0.75


def test_overlay_marks_ground_truth():
  from efficientad_jax import pictures

  rgb = np.zeros((16, 16, 3), np.uint8)
  mask = np.zeros((16, 16), bool)
  mask[4:10, 4:10] = True
  out = pictures.overlay(rgb, np.zeros((16, 16)), 0.0, 1.0, mask=mask)
  assert (out[4, 4] == pictures.CONTOUR_RGB).all() and not (out[6, 6] == pictures.CONTOUR_RGB).all()
  with pytest.raises(ValueError, match="sizes differ"):
    pictures.overlay(rgb, np.zeros((8, 8)), 0.0, 1.0)


def test_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a saved model"):
    evaluate.evaluate(tmp_path)


def test_predict_records_compiles_once_per_original_size(ad):
  model = predict.load(ad[0])
  base = list(make_datasets(model.cfg.data, SIZE, seed=0).test)[:7]
  records = [dict(r, orig_size=np.array((48, 80) if i % 2 else (SIZE, SIZE))) for i, r in enumerate(base)]
  with count_compiles() as compiled:
    infos, maps, scores, images = evaluate.predict_records(model, records, B, progress=False)
  assert len(compiled) == 1  # only (48, 80) is new: (64, 64) at batch B was compiled by make_run
  assert [m.shape for m in maps] == [tuple(r["orig_size"]) for r in records]
  np.testing.assert_array_equal(scores, [m.max() for m in maps])
  assert "image" not in infos[0] and infos[3]["id"] == records[3]["id"]
  from efficientad_jax import pictures

  by_id = {r["id"]: r for r in records}
  for info, image in zip(infos, images):  # the network input as a picture, for the report
    expected = pictures.denormalize(by_id[info["id"]]["image"], model.inputs.mean, model.inputs.std)
    np.testing.assert_array_equal(image, expected)


def test_report_shows_every_test_image_with_its_decision(ad):
  """report.html: one card per test image, its score and outcome as scores.csv says, its pictures on disk."""
  import csv

  from tests.test_report import page_data

  run, m = ad
  out = run / "eval"
  data = {d["name"]: d for d in page_data((out / "report.html").read_text())}
  rows = list(csv.DictReader(open(out / "scores.csv")))
  assert len(data) == len(rows) == m["num_images"]
  t = m["decision"]["threshold"]
  for row in rows:
    card, score, label = data[row["id"]], float(row["score"]), row["label"] == "1"
    assert card["score"] == pytest.approx(score, rel=1e-5) and int(row["anomalous"]) == (score > t)
    assert card["outcome"] == f"{'true' if (score > t) == label else 'false'} {'positive' if score > t else 'negative'}"
    assert card["group"] == row["defect"] == row["id"].split("/")[1]
    assert (out / card["thumb"]).is_file() and (out / card["full"]).is_file()


def test_report_renders_in_a_browser(ad):
  """Screenshot of the evaluation's page in headless Chromium: the plots are drawn (the curves' colour), and
  the gallery's thumbnails are shown (the page with images blocked differs by about one thumbnail area per
  test image)."""
  from efficientad_jax import report
  from tests import browser

  run, m = ad
  page = run / "eval" / "report.html"
  window = (1280, 2400)  # tall enough for the whole page of a few test images
  shot = browser.screenshot(page, window).astype(int)
  blank = browser.screenshot(page, window, images=False).astype(int)
  curve = np.array([int(report.CURVE_RGB[k : k + 2], 16) for k in (1, 3, 5)])
  assert (np.abs(shot - curve).sum(-1) < 40).sum() > 500  # ROC and PR lines, ~2 px wide
  changed = (np.abs(shot - blank).sum(-1) > 30).sum()
  thumb = report.THUMB_SIDE**2  # the synthetic images are square: each thumbnail fills its card's width
  assert changed > 0.5 * m["num_images"] * thumb


def test_threshold_choices_by_hand(ad, tmp_path):
  """--threshold f1 decides as the test set's F1-optimal point (score >= t); --fpr and a number as
  thresholds.choose; a bad choice fails before anything is predicted; the normalised scores in scores.csv
  are 0.5 * (s - median) / (t - median) of the model's validation scores."""
  import csv
  import types

  from efficientad_jax.serving import thresholds

  scores, labels = np.array([0.1, 0.4, 0.35, 0.8], np.float32), np.array([0, 0, 1, 1])
  model = types.SimpleNamespace(threshold=0.3, validation_scores=[0.1, 0.2, 0.3, 0.4])
  t, rule = evaluate.choose_threshold(model, scores, labels, "f1", None)
  assert "F1-optimal" in rule and list(scores > t) == [False, True, True, True]  # 0.35 itself is anomalous
  assert evaluate.choose_threshold(model, scores, labels, 0.2, None)[0] == 0.2
  assert evaluate.choose_threshold(model, scores, labels, None, 0.25)[0] == np.float32(0.3)  # 1 of 4 above
  assert evaluate.choose_threshold(model, scores, labels, None, None)[0] == 0.3
  with pytest.raises(thresholds.ThresholdError, match="both normal and anomalous"):
    evaluate.choose_threshold(model, scores, np.ones(4), "f1", None)

  run, m = ad
  with pytest.raises(thresholds.ThresholdError, match="--fpr 1.5"):
    evaluate.evaluate(run, out_dir=tmp_path / "bad", fpr=1.5, report=False, progress=False)
  assert not (tmp_path / "bad" / "metrics.json").exists()

  f1 = evaluate.evaluate(run, out_dir=tmp_path / "f1", threshold="f1", report=False, batch_size=B, progress=False)
  d = f1["decision"]
  assert d["accuracy_at_threshold"] == pytest.approx(d["accuracy_at_f1_optimal"])
  assert d["saved_threshold"] == m["decision"]["threshold"] and "F1-optimal" in d["threshold_rule"]
  assert f1["metrics"] == m["metrics"]  # the threshold changes decisions only

  validation = predict.load(run).validation_scores
  median = float(np.median(validation))
  t = median + 0.01  # above the median: the normalised scale exists
  given = evaluate.evaluate(run, out_dir=tmp_path / "n", threshold=t, report=False, batch_size=B, progress=False)
  rows = list(csv.DictReader(open(tmp_path / "n" / "scores.csv")))
  for row in rows:
    s = float(row["score"])
    assert int(row["anomalous"]) == (s > t)
    assert float(row["normalized_score"]) == pytest.approx(0.5 * (s - median) / (t - median), abs=1e-4)
  assert given["decision"]["threshold"] == t and len(rows) == m["num_images"]
