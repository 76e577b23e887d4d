"""TFDS builders (array_record, no TensorFlow) read back with tfds.data_source (docs/method.md §4.3)."""

import dataclasses
import importlib.util
import re
import shutil

import numpy as np
import pytest

from efficientad_jax.config import DataConfig
from efficientad_jax.data import api, tfds_builders
from efficientad_jax.data.records import DataError
from tests import fixture_sets
from tests.test_data_indexes import make_visa


def test_tensorflow_is_not_installed():
  # The builders must work without TF; if this fails, the environment changed, not the code.
  assert importlib.util.find_spec("tensorflow") is None


def _both(cfg):
  return (api.make_datasets(cfg, 24, seed=0), api.make_datasets(dataclasses.replace(cfg, source="files"), 24, seed=0))


def _same_records(a, b):
  by_id = {r["id"]: r for r in b}
  got = list(a)
  assert sorted(r["id"] for r in got) == sorted(by_id)
  for rec in got:
    ref = by_id[rec["id"]]
    for key in rec:
      if key == "channels":
        strip = lambda cs: [{k: v for k, v in c.items() if k != "mask"} for c in cs]
        assert strip(rec[key]) == strip(ref[key])
        assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(rec[key], ref[key]))
      else:
        assert np.array_equal(rec[key], ref[key]), (rec["id"], key)


def test_mvtec_ad_tfds_matches_files(fixtures, tmp_path):
  ad = fixture_sets.mvtec_ad(fixtures)
  cfg = DataConfig(
    dataset="mvtec_ad", root=str(ad.root), category=ad.category, source="tfds", tfds_data_dir=str(tmp_path / "tfds")
  )
  via_tfds, via_files = _both(cfg)
  _same_records(via_tfds.test, via_files.test)
  _same_records(via_tfds.validation, via_files.validation)  # the same seeded hold-out
  _same_records(via_tfds.train_eval, via_files.train_eval)
  # The listing written to RUN/splits.json: TFDS record ids, the same split as the file index's paths.
  listing, files = via_tfds.listing(), via_files.listing()
  for split, records in (("train", via_tfds.train_eval), ("validation", via_tfds.validation)):
    assert sorted(listing[split]) == sorted("tfds:" + r["id"] for r in records)
    assert len(listing[split]) == len(files[split]) and all(f.endswith(".png") for f in files[split])
  version = str(tfds_builders.MvtecAd.VERSION)
  assert list((tmp_path / "tfds/mvtec_ad" / ad.category / version).glob("*.array_record-*"))
  batch = next(via_tfds.train_iter(2))
  assert batch["image"].shape == (2, 24, 24, 3)


def test_loco_tfds_records_and_saturation(fixtures, tmp_path):
  loco = fixture_sets.mvtec_loco(fixtures)
  cfg = DataConfig(
    dataset="mvtec_loco",
    root=str(loco.root),
    category=loco.category,
    source="tfds",
    tfds_data_dir=str(tmp_path / "tfds"),
  )
  via_tfds, via_files = _both(cfg)
  _same_records(via_tfds.test, via_files.test)
  _same_records(via_tfds.validation, via_files.validation)
  assert via_tfds.info.defects_config == via_files.info.defects_config
  import tensorflow_datasets as tfds

  raw = tfds.data_source(f"mvtec_loco/{loco.category}", split="test", data_dir=str(tmp_path / "tfds"), download=False)
  want = {f"test/{i['split']}/{i['id']}": [c["saturation_area"] for c in i["channels"]] for i in loco.doc["images"]}
  assert len(raw) == len(want)
  for rec in raw:
    assert list(rec["channel_saturation_areas"]) == want[rec["id"].decode()]
    assert (rec["height"], rec["width"]) == loco.size_hw


def test_visa_tfds(tmp_path):
  root = make_visa(tmp_path / "visa")
  cfg = DataConfig(
    dataset="visa",
    root=str(root),
    category="candle",
    source="tfds",
    tfds_data_dir=str(tmp_path / "tfds"),
    validation_fraction=0.25,
  )
  via_tfds, via_files = _both(cfg)
  _same_records(via_tfds.test, via_files.test)
  _same_records(via_tfds.validation, via_files.validation)


def test_failed_build_leaves_no_cache_and_build_is_cached(fixtures, tmp_path):
  ad = fixture_sets.mvtec_ad(fixtures)
  shutil.copytree(ad.root, tmp_path / "ad")
  good = fixture_sets.pngs(ad.category_dir / "test/good")[-1]  # an unmasked test image
  broken = tmp_path / "ad" / good.relative_to(ad.root)
  broken.write_bytes(b"broken")
  data_dir = tmp_path / "tfds"
  cfg = DataConfig(
    dataset="mvtec_ad", root=str(tmp_path / "ad"), category=ad.category, source="tfds", tfds_data_dir=str(data_dir)
  )
  with pytest.raises(Exception, match=rf"good/{good.name}: corrupt"):
    api.make_datasets(cfg, 24, 0)
  leftovers = [p for p in data_dir.rglob("*") if p.is_file() and ".config" not in p.parts]
  assert leftovers == []  # no records, no dataset_info: nothing that looks like a cache
  shutil.copy(good, broken)
  api.make_datasets(cfg, 24, 0)
  version = str(tfds_builders.MvtecAd.VERSION)
  shards = sorted((data_dir / "mvtec_ad" / ad.category / version).glob("*.array_record-*"))
  stamps = [p.stat().st_mtime_ns for p in shards]
  api.make_datasets(cfg, 24, 0)  # cached: not rebuilt
  assert [p.stat().st_mtime_ns for p in shards] == stamps


def test_tfds_errors(fixtures, tmp_path):
  ad = fixture_sets.mvtec_ad(fixtures)
  typo = ad.category[:-1]
  cfg = DataConfig(dataset="mvtec_ad", root=str(ad.root), category=typo, source="tfds", tfds_data_dir=str(tmp_path))
  known = rf"'{re.escape(typo)}' is not a mvtec_ad config; available: .*'{re.escape(ad.category)}'"
  with pytest.raises(DataError, match=known):
    api.make_datasets(cfg, 24, 0)
  with pytest.raises(DataError, match="supports"):
    api.make_datasets(dataclasses.replace(cfg, dataset="folder"), 24, 0)
