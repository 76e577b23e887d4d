"""Metrics against independent brute-force references (one loop per threshold) and error cases."""

import itertools

import numpy as np
import pytest

from efficientad_jax import metrics

SEEDS = range(6)


# ------------------------------------------------------------------------------------------------
# Independent references: a Python loop over every threshold, integration segment by segment.


def _bounded_area(points: list[tuple[float, float]], limit: float) -> float:
  """Area under the polyline through `points` (sorted by x, then y) over [0, limit], segment by segment."""
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
    if x1 <= x0 or x0 >= limit:
      continue
    end = min(x1, limit)
    y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
    area += 0.5 * (y0 + y_end) * (end - x0)
  return area


def _mann_whitney_auroc(scores, labels) -> float:
  pos, neg = scores[labels], scores[~labels]
  greater = (pos[:, None] > neg[None, :]).sum()
  equal = (pos[:, None] == neg[None, :]).sum()
  return (greater + 0.5 * equal) / (pos.size * neg.size)


def _brute_f1(scores, labels) -> dict:
  best = None
  for t in sorted(set(scores.tolist()), reverse=True):
    predicted = scores >= t
    tp = np.sum(predicted & labels)
    precision, recall = tp / predicted.sum(), tp / labels.sum()
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    if best is None or f1 > best["f1"] + 1e-12:
      best = {"f1": f1, "precision": precision, "recall": recall, "threshold": t}
  return best


def _flood_fill_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
  """8-connected regions by breadth-first search (independent of scipy)."""
  seen = np.zeros(mask.shape, dtype=bool)
  regions = []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    seen[start] = True
    queue, region = [start], []
    while queue:
      r, c = queue.pop()
      region.append((r, c))
      for dr, dc in itertools.product((-1, 0, 1), repeat=2):
        rr, cc = r + dr, c + dc
        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
          seen[rr, cc] = True
          queue.append((rr, cc))
    regions.append(region)
  return regions


def _brute_pro_points(maps, masks):
  regions = [(i, region) for i, mask in enumerate(masks) for region in _flood_fill_regions(mask)]
  ok = np.concatenate([~m.ravel() for m in masks])
  flat = np.concatenate([m.ravel() for m in maps])
  points = [(0.0, 0.0)]
  for t in sorted(set(flat.tolist()), reverse=True):
    fpr = np.sum((flat >= t) & ok) / ok.sum()
    pro = np.mean([np.mean([maps[i][rc] >= t for rc in region]) for i, region in regions])
    points.append((fpr, pro))
  return points + [(1.0, 1.0)]


def _brute_spro_points(maps, channels):
  """The official per-threshold definition: positive = score > t, at every distinct score and min - 1."""
  flat = np.concatenate([m.ravel() for m in maps])
  thresholds = sorted(set(flat.tolist()) | {flat.min() - 1.0}, reverse=True)
  unions = [
    np.any([c[0] for c in chans], axis=0) if chans else np.zeros(m.shape, bool) for m, chans in zip(maps, channels)
  ]
  points = []
  for t in thresholds:
    fp = sum(np.sum((m > t) & ~u) for m, u in zip(maps, unions))
    negatives = sum(np.sum(~u) for u in unions)
    spros = [min(np.sum((m > t) & mask) / sat, 1.0) for m, chans in zip(maps, channels) for mask, sat in chans]
    points.append((fp / negatives, np.mean(spros)))
  return points


def _random_maps(rng, num, shape, levels):
  """Maps quantised to `levels` values, so ties within and across images are frequent."""
  return [rng.integers(0, levels, shape).astype(np.float32) / levels for _ in range(num)]


def _random_mask(rng, shape, p):
  return rng.random(shape) < p


# ------------------------------------------------------------------------------------------------
# ROC and F1.


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_mann_whitney_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 60))
  scores = rng.integers(0, 7, n).astype(np.float64)
  labels = rng.random(n) < 0.4
  labels[:2] = [True, False]
  assert metrics.auroc(scores, labels) == pytest.approx(_mann_whitney_auroc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_optimal_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 60))
  scores = rng.integers(0, 9, n).astype(np.float64)
  labels = rng.random(n) < 0.3
  labels[:2] = [True, False]
  got, want = metrics.f1_optimal(scores, labels), _brute_f1(scores, labels)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_roc_curve_endpoints_and_perfect_separation():
  fpr, tpr, thresholds = metrics.roc_curve(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
  np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1, 1])
  assert thresholds[0] == np.inf
  assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
  assert metrics.auroc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5  # one tie group: the diagonal


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_pixel_and_image_metrics_match_flat_references(seed):
  rng = np.random.default_rng(seed)
  maps = _random_maps(rng, 5, (6, 7), 10)
  masks = [_random_mask(rng, (6, 7), 0.2) for _ in maps]
  labels = np.array([m.any() for m in masks])
  labels[:2] = [True, False]
  flat, flat_labels = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
  assert metrics.pixel_auroc(maps, masks) == pytest.approx(_mann_whitney_auroc(flat, flat_labels), abs=1e-12)
  assert metrics.pixel_f1(maps, masks)["f1"] == pytest.approx(_brute_f1(flat, flat_labels)["f1"], abs=1e-12)
  maxima = np.array([m.max() for m in maps], dtype=np.float64)
  assert metrics.image_auroc(maps, labels) == pytest.approx(_mann_whitney_auroc(maxima, labels), abs=1e-12)
  assert metrics.image_f1(np.stack(maps), labels) == pytest.approx(_brute_f1(maxima, labels), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Bounded trapezoid, AU-PRO, AU-sPRO.


def test_trapezoid_bounded():
  assert metrics.trapezoid(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5) == pytest.approx(0.125)
  # Vertical step at x = 0.2: the top of the step is used beyond it.
  x, y = np.array([0.0, 0.2, 0.2, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])
  assert metrics.trapezoid(x, y, 0.6) == pytest.approx(0.4)
  assert metrics.trapezoid(x, y, 0.2) == pytest.approx(0.0)
  assert metrics.trapezoid(x, y) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", SEEDS)
def test_au_pro_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (int(rng.integers(4, 9)), int(rng.integers(4, 9)))
  maps = _random_maps(rng, 4, shape, 12)
  masks = [_random_mask(rng, shape, 0.25) for _ in maps]
  masks[0][:] = False  # a good image
  masks[1][0, 0] = masks[1][1, 1] = True  # diagonal neighbours: one region with 8-connectivity
  points = _brute_pro_points(maps, masks)
  got = metrics.au_pro(maps, masks, (0.05, 0.1, 0.3, 1.0))
  for limit, value in got.items():
    # float32 FPRs (as the official code) against float64 ones here.
    assert value == pytest.approx(_bounded_area(points, limit) / limit, abs=1e-6), limit


@pytest.mark.parametrize("seed", SEEDS)
def test_au_spro_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (int(rng.integers(5, 10)), int(rng.integers(5, 10)))
  maps = _random_maps(rng, 5, shape, int(rng.integers(3, 15)))
  channels = [[]]  # one good image
  for _ in range(4):
    chans = []
    for _ in range(int(rng.integers(1, 3))):  # two channels may overlap
      mask = _random_mask(rng, shape, 0.3)
      mask[rng.integers(shape[0]), rng.integers(shape[1])] = True
      area = int(mask.sum())
      # Integer, fractional (absolute thresholds need not be integers) and full saturation areas.
      sat = rng.choice([area, max(1, area // 2), min(area, 2.5), metrics.saturation_area(area, 0.6, True) or 1.0])
      chans.append(metrics.DefectChannel(mask, float(sat)))
    channels.append(chans)
  points = sorted(_brute_spro_points(maps, channels))
  got = metrics.au_spro(maps, channels, (0.01, 0.05, 0.1, 0.3, 1.0))
  for limit, value in got.items():
    assert value == pytest.approx(_bounded_area(points, limit) / limit, abs=1e-12), limit


def test_saturation_area_rule():
  assert metrics.saturation_area(87, 0.5, relative=True) == 43  # truncation, not rounding
  assert metrics.saturation_area(7, 35, relative=False) == 7
  assert metrics.saturation_area(682, 400, relative=False) == 400


def test_channel_from_gt():
  config = [
    {"defect_name": "a", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "b", "pixel_value": 250, "saturation_threshold": 3, "relative_saturation": False},
  ]
  gt = np.zeros((4, 5), dtype=np.uint8)
  gt[1:3, 1:4] = 255
  channel, entry = metrics.channel_from_gt(gt, config)
  assert entry["defect_name"] == "a" and channel.saturation_area == 3 and channel.mask.sum() == 6
  gt[0, 0] = 250
  with pytest.raises(ValueError, match="one defect value"):
    metrics.channel_from_gt(gt, config)
  with pytest.raises(ValueError, match="pixel value 7"):
    metrics.channel_from_gt(np.full((2, 2), 7, np.uint8), config)


def test_loco_result_dict_mean_is_average():
  rng = np.random.default_rng(0)
  maps = _random_maps(rng, 6, (8, 8), 20)
  masks = [_random_mask(rng, (8, 8), 0.3) for _ in maps]
  channels = [[], [], [(masks[2], 4.0)], [(masks[3], 2.5)], [(masks[4], 3.0)], [(masks[5], 1.0)]]
  splits = ["good", "good", "structural_anomalies", "structural_anomalies", "logical_anomalies", "logical"]
  result = metrics.mvtec_loco_metrics(maps, channels, splits)
  assert set(result) == {"structural", "logical", "mean"}
  for limit in metrics.SPRO_LIMITS:
    assert result["mean"]["au_spro"][limit] == pytest.approx(
      (result["structural"]["au_spro"][limit] + result["logical"]["au_spro"][limit]) / 2
    )
  want = metrics.au_spro(maps[:4], channels[:4])
  assert result["structural"]["au_spro"] == want


def test_pixel_auroc_is_vectorised_for_large_inputs():
  """4 million pixels with heavy ties: a per-threshold loop would take minutes."""
  rng = np.random.default_rng(1)
  maps = (rng.integers(0, 1000, (4, 1000, 1000)) / 1000).astype(np.float32)
  masks = np.zeros(maps.shape, dtype=bool)
  masks[:, 100:200, 100:300] = True
  maps[masks] += 0.5
  assert metrics.pixel_auroc(maps, masks) > 0.8
  assert 0.0 < metrics.au_pro(maps, masks, (0.3,))[0.3] <= 1.0


# ------------------------------------------------------------------------------------------------
# Errors.


def test_errors():
  amap, mask = np.zeros((4, 4), np.float32), np.zeros((4, 4), bool)
  mask[0, 0] = True
  with pytest.raises(ValueError, match="shape"):
    metrics.pixel_auroc([amap], [np.zeros((4, 5), bool)])
  with pytest.raises(ValueError, match="shape"):
    metrics.au_pro([amap], [np.zeros((3, 4), bool)])
  with pytest.raises(ValueError, match="no maps"):
    metrics.au_pro([], [])
  with pytest.raises(ValueError, match="no scores"):
    metrics.auroc(np.array([]), np.array([]))
  with pytest.raises(ValueError, match="no positive"):
    metrics.auroc(np.arange(3.0), np.zeros(3))
  with pytest.raises(ValueError, match="no negative"):
    metrics.f1_optimal(np.arange(3.0), np.ones(3))
  with pytest.raises(ValueError, match="no positive"):
    metrics.pixel_auroc([amap], [np.zeros((4, 4), bool)])
  with pytest.raises(ValueError, match="no defect region"):
    metrics.au_pro([amap], [np.zeros((4, 4), bool)])
  with pytest.raises(ValueError, match="no defect-free"):
    metrics.au_pro([amap], [np.ones((4, 4), bool)])
  with pytest.raises(ValueError, match="NaN"):
    metrics.au_pro([np.full((4, 4), np.nan)], [mask])
  with pytest.raises(ValueError, match="image labels"):
    metrics.image_auroc([amap, amap], [1])
  with pytest.raises(ValueError, match="not in"):
    metrics.au_pro([amap], [mask], (0.0,))
  with pytest.raises(ValueError, match="no defect channel"):
    metrics.au_spro([amap], [[]])
  with pytest.raises(ValueError, match="mask shape"):
    metrics.au_spro([amap], [[(np.ones((2, 2), bool), 1.0)]])
  with pytest.raises(ValueError, match="saturation area"):
    metrics.au_spro([amap], [[(mask, 0.0)]])
  with pytest.raises(ValueError, match="channel lists"):
    metrics.au_spro([amap, amap], [[(mask, 1.0)]])
  with pytest.raises(ValueError, match="unknown LOCO splits"):
    metrics.mvtec_loco_metrics([amap], [[(mask, 1.0)]], ["weird"])


def test_single_sort_helpers_agree():
  rng = np.random.default_rng(3)
  maps = _random_maps(rng, 3, (5, 6), 8)
  masks = [_random_mask(rng, (5, 6), 0.3) for _ in maps]
  auc, f1 = metrics.pixel_auroc_and_f1(maps, masks)
  assert auc == metrics.pixel_auroc(maps, masks) and f1 == metrics.pixel_f1(maps, masks)
