"""Metrics against the official MVTec AD / MVTec LOCO evaluations (fixtures README sections 4 and 5).

Every expected number is read from the fixture JSON files, every image listed there is used, so these
tests hold for any fixture set in that format.
"""

import json
import pathlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from efficientad_jax import metrics

# Tolerances of the fixtures README (sections 4 and 5.4).
PRO_ATOL = 1e-6
AUROC_ATOL = 1e-9
DENSE_SPRO_ATOL = 1e-6
OFFICIAL_SPRO_ATOL = 1e-3
SPLIT_KEYS = {"structural": "structural_anomalies", "logical": "logical_anomalies", "mean": "mean"}


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ad(fixtures):
  """MVTec AD set: (expected.json, maps, masks, labels), in the order of expected.json images."""
  root = fixtures / "mvtec_ad"
  expected = _read_json(root / "expected.json")
  maps, masks, labels = [], [], []
  for image in expected["images"]:
    rel = pathlib.PurePosixPath(image["path"])  # test/<class>/NNN.png
    amap = tifffile.imread(root / expected["anomaly_maps_dir"] / expected["object"] / rel.with_suffix(".tiff"))
    good = image["label"] == "good"
    if good:
      mask = np.zeros(amap.shape, dtype=bool)
    else:
      gt = root / expected["dataset_dir"] / expected["object"] / "ground_truth" / rel.parent.name
      mask = np.asarray(Image.open(gt / f"{rel.stem}_mask.png")) != 0
    maps.append(amap)
    masks.append(mask)
    labels.append(0 if good else 1)
  return expected, maps, masks, labels


@pytest.fixture(scope="module")
def loco(fixtures):
  """MVTec LOCO set: (expected.json, defects_config, {case: maps}, channels, splits)."""
  root = fixtures / "mvtec_loco"
  expected = _read_json(root / "expected.json")
  obj_dir = root / expected["dataset_dir"] / expected["object"]
  config = _read_json(obj_dir / "defects_config.json")
  cases = [k for k, v in expected.items() if isinstance(v, dict) and "anomaly_maps_dir" in v]
  maps = {case: [] for case in cases}
  channels, splits = [], []
  for image in expected["images"]:
    for case in cases:
      path = root / expected[case]["anomaly_maps_dir"] / expected["object"] / "test" / image["split"]
      maps[case].append(tifffile.imread(path / f"{image['id']}.tiff"))
    gt_dir = obj_dir / "ground_truth" / image["split"] / image["id"]
    channels.append([metrics.channel_from_gt(gt_dir / c["png"], config)[0] for c in image["channels"]])
    splits.append(image["split"])
  return expected, config, maps, channels, splits


def test_ad_regions_are_8_connected(ad):
  expected, _, masks, _ = ad
  for image, mask in zip(expected["images"], masks):
    assert int(mask.sum()) == image["gt_pixels"], image["path"]
    assert metrics.label_regions(mask)[1] == image["gt_regions_8conn"], image["path"]
    # The 4-connected count differs on this data; it shows which connectivity is being checked.
    assert ndimage.label(mask)[1] == image["gt_regions_4conn"], image["path"]


def test_ad_au_pro_matches_official(ad):
  expected, maps, masks, _ = ad
  limits = [float(k) for k in expected["au_pro"]]
  got = metrics.au_pro(maps, masks, limits)
  for key, value in expected["au_pro"].items():
    np.testing.assert_allclose(got[float(key)], value, rtol=0, atol=PRO_ATOL, err_msg=f"AU-PRO@{key}")
  fpr, pro = metrics.pro_curve(maps, masks)
  assert fpr.size == expected["pro_curve_num_points_incl_endpoints"]
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_ad_official_cli_numbers(ad):
  expected, maps, masks, labels = ad
  key = next(k for k in expected if k.startswith("official_cli_metrics_json_at_"))
  limit = float(key.rsplit("_", 1)[1])
  cli = expected[key][expected["object"]]
  result = metrics.mvtec_ad_metrics(maps, masks, labels, pro_limits=[limit])
  np.testing.assert_allclose(result["au_pro"][limit], cli["au_pro"], rtol=0, atol=PRO_ATOL)
  np.testing.assert_allclose(result["image_auroc"], cli["classification_au_roc"], rtol=0, atol=AUROC_ATOL)


def test_ad_image_auroc_and_roc_curve(ad):
  expected, maps, _, labels = ad
  np.testing.assert_allclose(
    [im["image_score_max"] for im in expected["images"]], metrics.image_scores(maps), rtol=0, atol=0
  )
  got = metrics.image_auroc(maps, labels)
  np.testing.assert_allclose(got, expected["classification_au_roc"], rtol=0, atol=AUROC_ATOL)
  fpr, tpr, _ = metrics.roc_curve(metrics.image_scores(maps), labels)
  np.testing.assert_allclose(fpr, expected["classification_roc_curve"]["fpr"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(tpr, expected["classification_roc_curve"]["tpr"], rtol=0, atol=1e-12)


def test_ad_result_dict(ad):
  expected, maps, masks, labels = ad
  result = metrics.mvtec_ad_metrics(maps, masks, labels)
  assert set(result["au_pro"]) == set(metrics.PRO_LIMITS)
  for key, value in expected["au_pro"].items():
    if float(key) in result["au_pro"]:
      np.testing.assert_allclose(result["au_pro"][float(key)], value, rtol=0, atol=PRO_ATOL)
  for level in ("image", "pixel"):
    for name in ("f1", "precision", "recall"):
      assert 0.0 <= result[f"{level}_{name}"] <= 1.0
  assert 0.0 <= result["pixel_auroc"] <= 1.0
  json.dumps({k: v if not isinstance(v, dict) else {str(a): b for a, b in v.items()} for k, v in result.items()})


def test_loco_channels_and_saturation_areas(loco):
  expected, _, maps, channels, _ = loco
  for image, image_channels in zip(expected["images"], channels):
    assert len(image_channels) == len(image["channels"])
    for ref, channel in zip(image["channels"], image_channels):
      assert int(channel.mask.sum()) == ref["area"], (image["split"], image["id"], ref["png"])
      assert channel.saturation_area == ref["saturation_area"], (image["split"], image["id"], ref["png"])
  for case, case_maps in maps.items():
    scores = metrics.image_scores(case_maps)
    np.testing.assert_allclose(scores, [im[f"image_score_max_{case}"] for im in expected["images"]], rtol=0, atol=0)


def _check_loco(result: dict, reference: dict, atol: float, what: str):
  """reference: {"structural_anomalies": {limit_str: value}, ...} as in the official metrics.json."""
  for split, key in SPLIT_KEYS.items():
    for limit, value in reference[key].items():
      np.testing.assert_allclose(
        result[split]["au_spro"][float(limit)], value, rtol=0, atol=atol, err_msg=f"{what} {split} AU-sPRO@{limit}"
      )


def test_loco_matches_dense_reference(loco):
  expected, _, maps, channels, splits = loco
  assert maps, "no LOCO map sets in expected.json"
  for case, case_maps in maps.items():
    dense = expected[case]["dense_all_distinct_thresholds"]["auc_spro"]
    limits = sorted({float(k) for split in dense.values() for k in split})
    result = metrics.mvtec_loco_metrics(case_maps, channels, splits, spro_limits=limits)
    _check_loco(result, dense, DENSE_SPRO_ATOL, f"{case} dense")


def test_loco_matches_official_metrics_files(loco, fixtures):
  expected, _, maps, channels, splits = loco
  for case, case_maps in maps.items():
    official = _read_json(fixtures / "mvtec_loco" / expected[case]["metrics_json"])
    spro_ref = official["localization"]["auc_spro"]
    limits = sorted({float(k) for split in spro_ref.values() for k in split})
    result = metrics.mvtec_loco_metrics(case_maps, channels, splits, spro_limits=limits)
    _check_loco(result, spro_ref, OFFICIAL_SPRO_ATOL, f"{case} official")
    _check_loco(result, expected[case]["auc_spro"], OFFICIAL_SPRO_ATOL, f"{case} expected.json")
    for split, key in SPLIT_KEYS.items():
      for reference in (official["classification"]["auc_roc"], expected[case]["auc_roc"]):
        np.testing.assert_allclose(
          result[split]["image_auroc"], reference[key], rtol=0, atol=AUROC_ATOL, err_msg=f"{case} {split} image AU-ROC"
        )


def test_loco_zeros_case_has_many_ties(loco):
  """The maps the official script fails on (exact zeros) are handled and give a monotone curve."""
  expected, _, maps, channels, splits = loco
  for case, case_maps in maps.items():
    values = np.concatenate([m.ravel() for m in case_maps])
    np.testing.assert_allclose(np.mean(values == 0), expected[case]["exact_zero_fraction"], rtol=0, atol=1e-12)
    keep = [i for i, s in enumerate(splits) if s != "logical_anomalies"]
    fpr, spro = metrics.spro_curve([case_maps[i] for i in keep], [channels[i] for i in keep])
    assert fpr[0] == 0 and spro[0] == 0 and fpr[-1] == 1 and spro[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= -1e-15)
