"""Dataset indexes on the fixture trees, generated synthetic trees and a tiny VisA tree (docs/method.md §4.2-§4.3)."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from efficientad_jax import metrics
from efficientad_jax.data import indexes, records, synthetic
from efficientad_jax.data.records import Sample
from tests import fixture_sets


def _ids(samples):
  return [s.id for s in samples]


def test_mvtec_ad_fixture_index(fixtures):
  ad = fixture_sets.mvtec_ad(fixtures)
  splits = indexes.index_mvtec_ad(ad.root, ad.category, seed=0, validation_fraction=0.1)
  train_ids = {f"train/good/{p.stem}" for p in fixture_sets.pngs(ad.category_dir / "train/good")}
  # The reference trains on int(0.9 n) of n images, so at least one is held out; one is always kept.
  n_val = min(len(train_ids) - int(0.9 * len(train_ids)), len(train_ids) - 1)
  assert len(splits.train) == len(train_ids) - n_val and len(splits.validation) == n_val
  assert {s.id for s in splits.train + splits.validation} == train_ids
  test = {s.id: s for s in splits.test}
  images = ad.doc["images"]  # expected.json lists every test image with its folder ("label")
  assert set(test) == {im["path"].removesuffix(".png") for im in images}
  assert sum(s.label for s in splits.test) == sum(im["label"] != "good" for im in images)
  for image in images:
    sample = test[image["path"].removesuffix(".png")]
    stem = pathlib.PurePosixPath(image["path"]).stem
    assert sample.defect == image["label"] and sample.label == int(image["label"] != "good")
    if sample.label:
      assert sample.mask == str(ad.category_dir / "ground_truth" / image["label"] / f"{stem}_mask.png")
    else:
      assert sample.mask is None
  assert all(s.loco_type == "" and s.channels == () for s in splits.test)


def test_mvtec_loco_fixture_index(fixtures):
  loco = fixture_sets.mvtec_loco(fixtures)
  splits = indexes.index_mvtec_loco(loco.root, loco.category)
  for split, samples in (("train", splits.train), ("validation", splits.validation)):
    files = fixture_sets.pngs(loco.category_dir / split / "good")
    assert _ids(samples) == [f"{split}/good/{p.stem}" for p in files]
  expected = loco.doc
  assert len(splits.test) == len(expected["images"])
  by_id = {s.id: s for s in splits.test}
  for image in expected["images"]:
    sample = by_id[f"test/{image['split']}/{image['id']}"]
    assert sample.loco_type == image["split"] == sample.defect
    assert sample.label == int(image["split"] != "good")
    assert [pathlib.Path(c).name for c in sample.channels] == [c["png"] for c in image["channels"]]
  names = [d["defect_name"] for d in expected["defects_config"]]
  assert [s.defect_name for s in splits.defects_config] == names


def saturation_area(spec: records.DefectSpec, area: int) -> float:
  """The one saturation rule (metrics.saturation_area), as the index applies it to a defects_config entry."""
  return metrics.saturation_area(area, spec.saturation_threshold, spec.relative_saturation)


def test_saturation_area_rule(fixtures):
  loco = fixture_sets.mvtec_loco(fixtures)
  specs = records.parse_defects_config(loco.category_dir / "defects_config.json")
  by_name = {s.defect_name: s for s in specs}
  # Every channel of the set: the areas the official script computed.
  for image in loco.doc["images"]:
    for c in image["channels"]:
      assert saturation_area(by_name[c["defect"]], c["area"]) == c["saturation_area"], c
  # The rule on both sides of each threshold: absolute = min(threshold, area); relative = int(t * area).
  for s in specs:
    t = s.saturation_threshold
    if s.relative_saturation:
      assert saturation_area(s, 101) == int(t * 101)
    else:
      assert saturation_area(s, int(t) + 50) == int(t)  # capped
      assert saturation_area(s, int(t) - 1) == int(t) - 1  # the area, when smaller


def test_hold_out_is_seeded_and_disjoint():
  samples = [Sample(image=f"{i}.png", id=f"train/good/{i:03d}", label=0, defect="good") for i in range(50)]
  train, val = records.hold_out(samples, 0.1, seed=3)
  assert len(val) == 5 and len(train) == 45
  assert not {s.id for s in train} & {s.id for s in val}
  again = records.hold_out(list(reversed(samples)), 0.1, seed=3)  # listing order is irrelevant
  assert again == (train, val)
  assert records.hold_out(samples, 0.1, seed=4)[1] != val
  assert records.hold_out(samples, 0.0, seed=3) == (tuple(samples), ())
  with pytest.raises(ValueError, match="validation_fraction"):
    records.hold_out(samples, 1.0, seed=0)


def test_hold_out_count_is_the_references():
  """The reference trains on int(0.9 n) images and validates on the rest, for every n."""
  for n in range(2, 10001):
    assert records.hold_out_count(n, 0.1) == n - int(0.9 * n), n
  for n in (2, 11, 25, 999):
    train, val = records.hold_out_positions([f"{i:05d}" for i in range(n)], 0.1, seed=0)
    assert len(val) == n - int(0.9 * n) and sorted(train + val) == list(range(n))
  # A single image stays for training (the reference would be left without any).
  assert records.hold_out_positions(["a"], 0.1, seed=0) == ([0], [])
  assert records.hold_out_count(7, 0.0) == 0
  with pytest.raises(ValueError, match="validation_fraction"):
    records.hold_out_count(7, -0.1)


def test_synthetic_mvtec_ad_layout(tmp_path):
  base = synthetic.generate_synthetic(tmp_path, "mvtec_ad", size=32, num_train=10, num_test=2)
  splits = indexes.index_mvtec_ad(tmp_path, base.name, seed=0)
  assert len(splits.train) == 9 and len(splits.validation) == 1
  assert len(splits.test) == 2 + 2 * len(synthetic.STRUCTURAL)
  for s in splits.test:
    if s.label:
      mask = np.asarray(Image.open(s.mask))
      assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
  assert np.asarray(Image.open(splits.train[0].image)).shape == (32, 32, 3)


def test_synthetic_loco_layout_and_config(tmp_path):
  base = synthetic.generate_synthetic(
    tmp_path, "mvtec_loco", size=48, num_train=4, num_validation=3, num_test=1, category="gadget"
  )
  splits = indexes.index_mvtec_loco(tmp_path, "gadget")
  assert (len(splits.train), len(splits.validation)) == (4, 3)
  types = [s.loco_type for s in splits.test]
  assert types.count("logical_anomalies") == len(synthetic.LOGICAL)
  assert types.count("structural_anomalies") == len(synthetic.STRUCTURAL)
  specs = records.parse_defects_config(base / "defects_config.json")  # the official format
  names = set()
  for s in splits.test:
    for png in s.channels:
      channel = records.loco_channel(np.asarray(Image.open(png)), specs, png)
      assert channel["area"] > 0 and 0 < channel["saturation_area"] <= channel["area"]
      names.add(channel["defect"])
  assert names == set(synthetic.LOGICAL) | set(synthetic.STRUCTURAL)


def test_synthetic_is_deterministic_and_cached(tmp_path):
  a = synthetic.render(40, 7, "test", "stain", 3)
  b = synthetic.render(40, 7, "test", "stain", 3)
  c = synthetic.render(40, 8, "test", "stain", 3)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  assert a[1].sum() > 0.02 * 40 * 40  # clearly visible anomaly
  base = synthetic.generate_synthetic(tmp_path, size=20, num_train=2, num_test=1)
  stamp = (base / "synthetic.json").stat().st_mtime_ns
  assert synthetic.generate_synthetic(tmp_path, size=20, num_train=2, num_test=1) == base
  assert (base / "synthetic.json").stat().st_mtime_ns == stamp  # reused, not rewritten
  synthetic.generate_synthetic(tmp_path, size=24, num_train=2, num_test=1)  # other arguments
  assert np.asarray(Image.open(base / "train/good/000.png")).shape == (24, 24, 3)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_synthetic_anomalies_differ_from_normals():
  good = synthetic.render(64, 0, "test", "good", 0)[0].astype(float)
  for defect in synthetic.STRUCTURAL + synthetic.LOGICAL:
    image, mask = synthetic.render(64, 0, "test", defect, 0)
    assert mask.sum() >= 20, defect
    # Inside the mask the image departs from a normal one far more than sensor noise.
    assert np.abs(image.astype(float) - good)[mask].mean() > 30, defect


def make_visa(root: pathlib.Path, rows=None) -> pathlib.Path:
  """A tiny VisA tree: object 'candle', 4 train normals, 1 test normal, 2 test anomalies."""
  rng = np.random.default_rng(0)
  lines = ["object,split,label,image,mask"]
  entries = rows or (
    [("train", "normal", f"Normal/{i:04d}") for i in range(4)]
    + [("test", "normal", "Normal/0100"), ("test", "anomaly", "Anomaly/000"), ("test", "anomaly", "Anomaly/001")]
  )
  for split, label, stem in entries:
    image = root / "candle/Data/Images" / f"{stem}.JPG"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(image, "JPEG")
    mask = ""
    if label == "anomaly":
      m = root / "candle/Data/Masks" / f"{stem}.png"
      m.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray((np.arange(12 * 16).reshape(12, 16) % 7 == 0).astype(np.uint8)).save(m)
      mask = f"candle/Data/Masks/{stem}.png"
    lines.append(f"candle,{split},{label},candle/Data/Images/{stem}.JPG,{mask}")
  (root / "split_csv").mkdir(parents=True, exist_ok=True)
  (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
  return root


def test_visa_index(tmp_path):
  root = make_visa(tmp_path)
  splits = indexes.index_visa(root, "candle", seed=0, validation_fraction=0.25)
  assert len(splits.train) == 3 and len(splits.validation) == 1
  assert _ids(splits.test) == ["test/anomaly/000", "test/anomaly/001", "test/good/0100"]
  assert [s.label for s in splits.test] == [1, 1, 0]
  assert splits.test[0].mask.endswith("Masks/Anomaly/000.png")


def test_folder_index(tmp_path):
  for i in range(5):
    p = tmp_path / "train/good" / f"{i}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(p)
  splits = indexes.index_folder(tmp_path, "", seed=0)
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (4, 1, 0)
  (tmp_path / "test/dent").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "test/dent/a.png")
  (tmp_path / "ground_truth/dent").mkdir(parents=True)
  Image.new("L", (8, 8)).save(tmp_path / "ground_truth/dent/a_mask.png")
  test = indexes.index_folder(tmp_path, "", seed=0).test
  assert [(s.id, s.label) for s in test] == [("test/dent/a", 1)]


def test_concurrent_generation_of_the_same_synthetic_tree(tmp_path):
  """Processes of one multi-process run generate the same tree at once; all must end with one valid tree."""
  import concurrent.futures

  from efficientad_jax.data import generate_synthetic, index_mvtec_loco

  args = dict(layout="mvtec_loco", size=32, num_train=3, num_test=2, num_validation=2)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    paths = list(pool.map(lambda _: generate_synthetic(tmp_path, **args), range(4)))
  assert len(set(paths)) == 1
  splits = index_mvtec_loco(tmp_path, "widget")
  assert len(splits.train) == 3 and len(splits.test) == 2 + 2 * 4 + 2 * 3
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary trees left behind
