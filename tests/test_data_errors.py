"""Bad input: every case is a `DataError` naming the file or folder (SPEC 2)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import DataConfig
from efficientad_jax.data import api, indexes, pipeline, preprocess, records
from efficientad_jax.data.records import DataError
from tests.test_data_indexes import make_visa


@pytest.fixture
def ad(fixtures, tmp_path):
  """A writable copy of the MVTec AD fixture tree; returns its root (category 'bottle')."""
  shutil.copytree(fixtures / "mvtec_ad/dataset", tmp_path / "ad")
  return tmp_path / "ad"


@pytest.fixture
def loco(fixtures, tmp_path):
  shutil.copytree(fixtures / "mvtec_loco/dataset", tmp_path / "loco")
  return tmp_path / "loco"


def test_missing_category_lists_available(ad):
  with pytest.raises(DataError, match=r"'botle' not found.*available: \['bottle'\]"):
    indexes.index_mvtec_ad(ad, "botle", 0)
  with pytest.raises(DataError, match="does not exist"):
    indexes.index_mvtec_ad(ad / "nowhere", "bottle", 0)


def test_misspelled_test_folder_lists_folders(ad):
  (ad / "bottle/test").rename(ad / "bottle/tests")
  with pytest.raises(DataError, match=r"bottle/test: missing.*'tests'"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_empty_train_split(ad):
  for p in (ad / "bottle/train/good").iterdir():
    p.unlink()
  with pytest.raises(DataError, match=r"train/good: empty split \(train\)"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_empty_defect_folder(ad):
  (ad / "bottle/test/scratch").mkdir()
  with pytest.raises(DataError, match=r"test/scratch: empty split"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_missing_mask(ad):
  (ad / "bottle/ground_truth/hole/001_mask.png").unlink()
  with pytest.raises(DataError, match=r"test/hole/001.png: its ground-truth mask .*001_mask.png"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_mask_without_image(ad):
  (ad / "bottle/test/crack/002.png").unlink()
  with pytest.raises(DataError, match=r"crack/002_mask.png: ground-truth mask without a test image"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_mask_size_mismatch(ad):
  Image.new("L", (10, 10)).save(ad / "bottle/ground_truth/crack/000_mask.png")
  with pytest.raises(DataError, match=r"crack/000_mask.png: mask size \(10, 10\).*differs"):
    indexes.index_mvtec_ad(ad, "bottle", 0)
  with pytest.raises(DataError, match="mask size"):
    preprocess.load_mask(str(ad / "bottle/ground_truth/crack/000_mask.png"), (64, 96),
                         "the_mask.png")


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
  (ad / "bottle/test/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  splits = indexes.index_mvtec_ad(ad, "bottle", 0)  # not a masked image: found at load time
  ds = pipeline.eval_dataset(splits.test, image_size=16, data_cfg=DataConfig())
  with pytest.raises(DataError, match=r"good/001.png: corrupt"):
    list(ds)
  (ad / "bottle/test/crack/000.png").write_bytes(b"broken")  # masked: found by the index
  with pytest.raises(DataError, match=r"crack/000.png: cannot be read"):
    indexes.index_mvtec_ad(ad, "bottle", 0)


def test_unsupported_mode(tmp_path):
  Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tiff")
  with pytest.raises(DataError, match=r"f.tiff: unsupported image mode 'F'"):
    preprocess.decode_image(str(tmp_path / "f.tiff"))


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("{}", "non-empty JSON list"),
    ('[{"defect_name": "x", "pixel_value": 255}]', "expected an object with keys"),
    ('[{"defect_name": "x", "pixel_value": 300, "saturation_threshold": 1,'
     ' "relative_saturation": true}]', "pixel_value must be an integer in 1..255"),
    ('[{"defect_name": "x", "pixel_value": 255, "saturation_threshold": 2.5,'
     ' "relative_saturation": true}]', r"relative saturation_threshold must be in \(0, 1\]"),
    ('[{"defect_name": "x", "pixel_value": 255, "saturation_threshold": 5,'
     ' "relative_saturation": "no"}]', "relative_saturation must be true/false"),
    ('[{"defect_name": "a", "pixel_value": 255, "saturation_threshold": 5,'
     ' "relative_saturation": false}, {"defect_name": "b", "pixel_value": 255,'
     ' "saturation_threshold": 5, "relative_saturation": false}]', "pixel_value must be unique"),
])
def test_malformed_defects_config(loco, text, match):
  (loco / "pushpins/defects_config.json").write_text(text)
  with pytest.raises(DataError, match=r"defects_config.json.*" + match):
    indexes.index_mvtec_loco(loco, "pushpins")


def test_missing_defects_config(loco):
  (loco / "pushpins/defects_config.json").unlink()
  with pytest.raises(DataError, match="defects_config.json: missing"):
    indexes.index_mvtec_loco(loco, "pushpins")


def test_unknown_pixel_value_in_loco_mask(loco):
  png = loco / "pushpins/ground_truth/logical_anomalies/000/000.png"
  mask = np.asarray(Image.open(png)).copy()
  mask[mask > 0] = 17
  Image.fromarray(mask).save(png)
  splits = indexes.index_mvtec_loco(loco, "pushpins")
  ds = pipeline.eval_dataset(splits.test, image_size=16, data_cfg=DataConfig(),
                             specs=splits.defects_config)
  with pytest.raises(DataError, match=r"logical_anomalies/000/000.png: pixel values \[17\]"):
    list(ds)
  mask[:2, :2] = 255  # two defects in one channel PNG
  mask[mask == 17] = 254
  with pytest.raises(DataError, match="exactly one defect value"):
    records.loco_channel(mask, splits.defects_config, str(png))


def test_loco_layout_errors(loco):
  shutil.rmtree(loco / "pushpins/ground_truth/structural_anomalies/002")
  with pytest.raises(DataError, match=r"structural_anomalies/002.png: its ground-truth folder"):
    indexes.index_mvtec_loco(loco, "pushpins")
  (loco / "pushpins/ground_truth/structural_anomalies/002").mkdir()
  with pytest.raises(DataError, match=r"structural_anomalies/002: no ground-truth PNGs"):
    indexes.index_mvtec_loco(loco, "pushpins")
  shutil.copytree(loco / "pushpins/ground_truth/structural_anomalies/001",
                  loco / "pushpins/ground_truth/structural_anomalies/002", dirs_exist_ok=True)
  shutil.copytree(loco / "pushpins/ground_truth/structural_anomalies/001",
                  loco / "pushpins/ground_truth/structural_anomalies/009")
  with pytest.raises(DataError, match=r"structural_anomalies/009: ground truth without a test image"):
    indexes.index_mvtec_loco(loco, "pushpins")
  shutil.rmtree(loco / "pushpins/ground_truth/structural_anomalies/009")
  (loco / "pushpins/test/logical_anomalies").rename(loco / "pushpins/test/logical_anomaly")
  with pytest.raises(DataError, match=r"unknown folders \['logical_anomaly'\]"):
    indexes.index_mvtec_loco(loco, "pushpins")
  shutil.rmtree(loco / "pushpins/validation")
  with pytest.raises(DataError, match=r"pushpins/validation/good: missing"):
    indexes.index_mvtec_loco(loco, "pushpins")


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
  specs = records.parse_defects_config(loco / "pushpins/defects_config.json")
  assert json.loads((loco / "pushpins/defects_config.json").read_text()) == [
      {**dataclasses.asdict(s), "saturation_threshold": (
          int(s.saturation_threshold) if not s.relative_saturation else s.saturation_threshold)}
      for s in specs]
