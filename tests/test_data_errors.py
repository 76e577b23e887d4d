"""Bad input: every case is a `DataError` naming the file or folder (docs/method.md §4)."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import DataConfig
from efficientad_jax.data import api, indexes, pipeline, preprocess, records
from efficientad_jax.data.records import DataError
from tests import fixture_sets
from tests.test_data_indexes import make_visa


@pytest.fixture
def ad(fixtures, tmp_path):
  """A writable copy of the MVTec AD fixture set (its category, sizes and expected.json unchanged)."""
  ref = fixture_sets.mvtec_ad(fixtures)
  shutil.copytree(ref.root, tmp_path / "ad")
  return dataclasses.replace(ref, root=tmp_path / "ad")


@pytest.fixture
def loco(fixtures, tmp_path):
  """A writable copy of the MVTec LOCO fixture set."""
  ref = fixture_sets.mvtec_loco(fixtures)
  shutil.copytree(ref.root, tmp_path / "loco")
  return dataclasses.replace(ref, root=tmp_path / "loco")


def _index_ad(ad):
  return indexes.index_mvtec_ad(ad.root, ad.category, 0)


def _first_mask(ad):
  """(defect folder, image stem, mask path) of the first mask of the first defect folder."""
  defect = fixture_sets.defect_folders(ad.category_dir)[0]
  mask = fixture_sets.pngs(ad.category_dir / "ground_truth" / defect)[0]
  return defect, mask.name.removesuffix("_mask.png"), mask


def test_missing_category_lists_available(ad):
  typo = ad.category[:-1]
  available = re.escape(str(fixture_sets.subfolders(ad.root)))
  with pytest.raises(DataError, match=rf"'{re.escape(typo)}' not found.*available: {available}"):
    indexes.index_mvtec_ad(ad.root, typo, 0)
  with pytest.raises(DataError, match="does not exist"):
    indexes.index_mvtec_ad(ad.root / "nowhere", ad.category, 0)


def test_misspelled_test_folder_lists_folders(ad):
  (ad.category_dir / "test").rename(ad.category_dir / "tests")
  with pytest.raises(DataError, match=rf"{re.escape(ad.category)}/test: missing.*'tests'"):
    _index_ad(ad)


def test_empty_train_split(ad):
  for p in (ad.category_dir / "train/good").iterdir():
    p.unlink()
  with pytest.raises(DataError, match=r"train/good: empty split \(train\)"):
    _index_ad(ad)


def test_empty_defect_folder(ad):
  name = fixture_sets.unused_name(fixture_sets.subfolders(ad.category_dir / "test"))
  (ad.category_dir / "test" / name).mkdir()
  with pytest.raises(DataError, match=rf"test/{name}: empty split"):
    _index_ad(ad)


def test_missing_mask(ad):
  defect, stem, mask = _first_mask(ad)
  mask.unlink()
  with pytest.raises(DataError, match=rf"test/{defect}/{stem}.png: its ground-truth mask .*{stem}_mask.png"):
    _index_ad(ad)


def test_mask_without_image(ad):
  defect, stem, _ = _first_mask(ad)
  (ad.category_dir / "test" / defect / f"{stem}.png").unlink()
  with pytest.raises(DataError, match=rf"{defect}/{stem}_mask.png: ground-truth mask without a test image"):
    _index_ad(ad)


def test_mask_size_mismatch(ad):
  defect, stem, mask = _first_mask(ad)
  h, w = ad.size_hw
  Image.new("L", (w + 3, h + 1)).save(mask)
  with pytest.raises(DataError, match=rf"{defect}/{stem}_mask.png: mask size \({w + 3}, {h + 1}\).*differs"):
    _index_ad(ad)
  with pytest.raises(DataError, match="mask size"):
    preprocess.load_mask(str(mask), ad.size_hw, "the_mask.png")


def test_corrupt_and_truncated_images(tmp_path):
  (tmp_path / "junk.png").write_bytes(b"this is not a png")
  with pytest.raises(DataError, match=r"junk.png: corrupt, truncated or not an image"):
    preprocess.decode_image(str(tmp_path / "junk.png"))
  buf = tmp_path / "full.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(buf)
  (tmp_path / "cut.png").write_bytes(buf.read_bytes()[:300])
  with pytest.raises(DataError, match=r"cut.png: corrupt, truncated"):
    preprocess.decode_image(str(tmp_path / "cut.png"))


def test_corrupt_image_fails_in_the_pipelines(ad):
  good = fixture_sets.pngs(ad.category_dir / "test/good")[0]
  good.write_bytes(b"\x89PNG\r\n\x1a\n broken")
  splits = _index_ad(ad)  # not a masked image: found at load time
  ds = pipeline.eval_dataset(splits.test, image_size=16, data_cfg=DataConfig())
  with pytest.raises(DataError, match=rf"good/{good.name}: corrupt"):
    list(ds)
  defect, stem, _ = _first_mask(ad)
  (ad.category_dir / "test" / defect / f"{stem}.png").write_bytes(b"broken")  # masked: found by the index
  with pytest.raises(DataError, match=rf"{defect}/{stem}.png: cannot be read"):
    _index_ad(ad)


def test_unsupported_mode(tmp_path):
  Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tiff")
  with pytest.raises(DataError, match=r"f.tiff: unsupported image mode 'F'"):
    preprocess.decode_image(str(tmp_path / "f.tiff"))


@pytest.mark.parametrize(
  "text, match",
  [
    ("{not json", "not valid JSON"),
    ("{}", "non-empty JSON list"),
    ('[{"defect_name": "x", "pixel_value": 255}]', "expected an object with keys"),
    (
      '[{"defect_name": "x", "pixel_value": 300, "saturation_threshold": 1, "relative_saturation": true}]',
      "pixel_value must be an integer in 1..255",
    ),
    (
      '[{"defect_name": "x", "pixel_value": 255, "saturation_threshold": 2.5, "relative_saturation": true}]',
      r"relative saturation_threshold must be in \(0, 1\]",
    ),
    (
      '[{"defect_name": "x", "pixel_value": 255, "saturation_threshold": 5, "relative_saturation": "no"}]',
      "relative_saturation must be true/false",
    ),
    (
      '[{"defect_name": "a", "pixel_value": 255, "saturation_threshold": 5,'
      ' "relative_saturation": false}, {"defect_name": "b", "pixel_value": 255,'
      ' "saturation_threshold": 5, "relative_saturation": false}]',
      "pixel_value must be unique",
    ),
  ],
)
def test_malformed_defects_config(loco, text, match):
  (loco.category_dir / "defects_config.json").write_text(text)
  with pytest.raises(DataError, match=r"defects_config.json.*" + match):
    indexes.index_mvtec_loco(loco.root, loco.category)


def test_missing_defects_config(loco):
  (loco.category_dir / "defects_config.json").unlink()
  with pytest.raises(DataError, match="defects_config.json: missing"):
    indexes.index_mvtec_loco(loco.root, loco.category)


def test_unknown_pixel_value_in_loco_mask(loco):
  gt = loco.category_dir / "ground_truth/logical_anomalies"
  image_id = fixture_sets.subfolders(gt)[0]
  png = fixture_sets.pngs(gt / image_id)[0]
  configured = sorted(d["pixel_value"] for d in loco.doc["defects_config"])
  unknown = next(v for v in range(1, 256) if v not in configured)
  mask = np.asarray(Image.open(png)).copy()
  mask[mask > 0] = unknown
  Image.fromarray(mask).save(png)
  splits = indexes.index_mvtec_loco(loco.root, loco.category)
  ds = pipeline.eval_dataset(splits.test, image_size=16, data_cfg=DataConfig(), specs=splits.defects_config)
  where = f"logical_anomalies/{image_id}/{png.name}"
  with pytest.raises(DataError, match=rf"{where}: pixel values \[{unknown}\]"):
    list(ds)
  mask[:2, :2] = configured[0]  # two defects in one channel PNG
  mask[mask == unknown] = configured[1]
  with pytest.raises(DataError, match="exactly one defect value"):
    records.loco_channel(mask, splits.defects_config, str(png))


def test_loco_layout_errors(loco):
  gt = loco.category_dir / "ground_truth/structural_anomalies"
  ids = fixture_sets.subfolders(gt)
  assert len(ids) >= 2, "the LOCO fixture needs two structural anomalies"
  victim, donor = ids[0], ids[1]
  index = lambda: indexes.index_mvtec_loco(loco.root, loco.category)
  shutil.rmtree(gt / victim)
  with pytest.raises(DataError, match=rf"structural_anomalies/{victim}.png: its ground-truth folder"):
    index()
  (gt / victim).mkdir()
  with pytest.raises(DataError, match=rf"structural_anomalies/{victim}: no ground-truth PNGs"):
    index()
  shutil.copytree(gt / donor, gt / victim, dirs_exist_ok=True)
  orphan = fixture_sets.unused_name(ids + fixture_sets.subfolders(loco.category_dir / "test"), "999")
  shutil.copytree(gt / donor, gt / orphan)
  with pytest.raises(DataError, match=rf"structural_anomalies/{orphan}: ground truth without a test image"):
    index()
  shutil.rmtree(gt / orphan)
  (loco.category_dir / "test/logical_anomalies").rename(loco.category_dir / "test/logical_anomaly")
  with pytest.raises(DataError, match=r"unknown folders \['logical_anomaly'\]"):
    index()
  shutil.rmtree(loco.category_dir / "validation")
  with pytest.raises(DataError, match=rf"{re.escape(loco.category)}/validation/good: missing"):
    index()


def test_visa_errors(tmp_path):
  with pytest.raises(DataError, match="1cls.csv: missing"):
    indexes.index_visa(tmp_path, "candle", 0)
  root = make_visa(tmp_path)
  with pytest.raises(DataError, match=r"'candel' not in .*1cls.csv; available: \['candle'\]"):
    indexes.index_visa(root, "candel", 0)
  (root / "candle/Data/Masks/Anomaly/001.png").unlink()
  with pytest.raises(DataError, match=r"1cls.csv:8: anomalous image .*001.JPG has no mask"):
    indexes.index_visa(root, "candle", 0)
  (root / "candle/Data/Images/Normal/0002.JPG").unlink()
  with pytest.raises(DataError, match=r"1cls.csv:4: image .*0002.JPG does not exist"):
    indexes.index_visa(root, "candle", 0)
  (root / "split_csv/1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
  with pytest.raises(DataError, match=r"missing columns \['label', 'mask'\]"):
    indexes.index_visa(root, "candle", 0)


def test_make_datasets_errors(tmp_path):
  with pytest.raises(DataError, match="unknown dataset 'mvtec'"):
    api.make_datasets(DataConfig(dataset="mvtec"), 32, 0)
  with pytest.raises(DataError, match="needs data.root"):
    api.make_datasets(DataConfig(dataset="mvtec_ad", category="bottle"), 32, 0)
  cfg = DataConfig(root=str(tmp_path), synthetic_size=16, synthetic_train=2, synthetic_test=1)
  with pytest.raises(DataError, match="penalty folder .*nope does not exist"):
    api.make_datasets(dataclasses.replace(cfg, penalty=str(tmp_path / "nope")), 16, 0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="penalty folder .*empty: no .jpg"):
    api.make_datasets(dataclasses.replace(cfg, penalty=str(tmp_path / "empty")), 16, 0)
  with pytest.raises(DataError, match="data.source must be"):
    api.make_datasets(dataclasses.replace(cfg, source="hdf5"), 16, 0)


def test_synthetic_refuses_to_overwrite_other_data(tmp_path):
  (tmp_path / "widget").mkdir()
  with pytest.raises(FileExistsError, match="not a synthetic dataset"):
    api.make_datasets(DataConfig(root=str(tmp_path)), 16, 0)


def test_saturation_config_round_trip(loco):
  specs = records.parse_defects_config(loco.category_dir / "defects_config.json")
  assert json.loads((loco.category_dir / "defects_config.json").read_text()) == [
    {
      **dataclasses.asdict(s),
      "saturation_threshold": (int(s.saturation_threshold) if not s.relative_saturation else s.saturation_threshold),
    }
    for s in specs
  ]
