"""Preprocessing and grain pipelines: conversions, jitter, penalty, determinism, resume (SPEC 2)."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from efficientad_jax.data import api, indexes, pipeline, preprocess


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic")


def _cfg(root, **kw):
  return DataConfig(root=str(root), synthetic_size=32, synthetic_train=12, synthetic_test=2, **kw)


def _penalty_folder(path, n=3):
  rng = np.random.default_rng(1)
  for i in range(n):
    sub = path / f"c{i % 2}"
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(
        sub / f"{i}.{'jpg' if i % 2 else 'png'}")
  return path


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
             for x, y in zip(a, b))


# --- decoding conversions ---------------------------------------------------------------------

def test_grayscale_becomes_three_equal_channels(tmp_path):
  gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
  Image.fromarray(gray).save(tmp_path / "g.png")
  rgb = preprocess.decode_image(str(tmp_path / "g.png"))
  assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8
  assert all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_rgba_drops_alpha(tmp_path):
  rgba = np.random.default_rng(0).integers(0, 255, (5, 7, 4), dtype=np.uint8)
  rgba[..., 3] = 0  # fully transparent: the colours must survive (no compositing)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  assert np.array_equal(preprocess.decode_image(str(tmp_path / "a.png")), rgba[..., :3])


def test_16bit_png_is_scaled_to_8bit(tmp_path):
  wide = np.array([[0, 257, 32896], [65535, 1000, 65280]], np.uint16)
  Image.fromarray(wide).save(tmp_path / "w.png")
  assert Image.open(tmp_path / "w.png").mode.startswith("I")
  rgb = preprocess.decode_image(str(tmp_path / "w.png"))
  assert np.array_equal(rgb[..., 0], [[0, 1, 128], [255, 4, 254]])
  assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_palette_and_bytes_and_arrays(tmp_path):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 4, 3), dtype=np.uint8))
  image.convert("P").save(tmp_path / "p.png")
  assert preprocess.decode_image(str(tmp_path / "p.png")).shape == (4, 4, 3)
  data = (tmp_path / "p.png").read_bytes()
  assert np.array_equal(preprocess.decode_image(data), preprocess.decode_image(tmp_path / "p.png"))
  assert preprocess.decode_image(np.zeros((3, 2), np.uint8)).shape == (3, 2, 3)


def test_resize_is_antialiased_bilinear():
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, ::2] = 255  # 1-pixel stripes: antialiasing averages them, point sampling does not
  small = preprocess.resize(stripes, 16)
  assert small.shape == (16, 16, 3)
  assert np.all(np.abs(small[:, 1:-1].astype(int) - 128) <= 2)  # interior: edges clamp


def test_normalize():
  x = np.full((2, 2, 3), 0.5, np.float32)
  y = preprocess.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_allclose(y[0, 0], (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD),
                             rtol=1e-6)
  assert y.dtype == np.float32


# --- colour jitter and penalty ----------------------------------------------------------------

def test_jitter_ops_follow_torchvision_semantics():
  x = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(preprocess.adjust_brightness(x, 1.1), np.clip(x * 1.1, 0, 1),
                             rtol=1e-6)
  gray = x[..., 0] * 0.2989 + x[..., 1] * 0.587 + x[..., 2] * 0.114
  np.testing.assert_allclose(preprocess.adjust_contrast(x, 0.8),
                             np.clip(0.8 * x + 0.2 * gray.mean(), 0, 1), rtol=1e-5)
  np.testing.assert_allclose(preprocess.adjust_saturation(x, 1.2),
                             np.clip(1.2 * x - 0.2 * gray[..., None], 0, 1), rtol=1e-5, atol=1e-6)
  assert np.array_equal(preprocess.adjust_saturation(x, 1.0), x)


def test_jitter_statistics():
  rng = np.random.default_rng(0)
  x = np.random.default_rng(1).uniform(0.2, 0.8, (8, 8, 3)).astype(np.float32)
  kinds, ratios = [], []
  for _ in range(600):
    y = preprocess.color_jitter(x, rng, 0.8, 1.2)
    assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    ratio = (y / x).ravel()
    if np.allclose(ratio, ratio[0], rtol=1e-5):
      kinds.append("brightness")
      ratios.append(ratio[0])
    else:
      kinds.append("other")
  share = kinds.count("brightness") / len(kinds)
  assert 0.25 < share < 0.42  # one of three ops, uniformly
  assert 0.8 - 1e-5 <= min(ratios) and max(ratios) <= 1.2 + 1e-5
  assert abs(np.mean(ratios) - 1.0) < 0.03 and np.std(ratios) > 0.08  # ~U(0.8, 1.2): std 0.115


def test_penalty_image_shape_and_grayscale():
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  grays = 0
  for _ in range(200):
    out = preprocess.penalty_image(image, rng, 64, 32, 0.3, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    raw = out * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)
    grays += np.allclose(raw[..., 0], raw[..., 1], atol=1e-5) and np.allclose(
        raw[..., 1], raw[..., 2], atol=1e-5)
  assert 0.2 < grays / 200 < 0.4
  # The centre crop of the resized image, exactly.
  full = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
  never_gray = preprocess.penalty_image(image, rng, 64, 32, 0.0, (0, 0, 0), (1, 1, 1))
  np.testing.assert_allclose(never_gray, full[16:48, 16:48] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match="larger than penalty_resize"):
    preprocess.penalty_image(image, rng, 16, 32, 0.3, IMAGENET_MEAN, IMAGENET_STD)


# --- pipelines --------------------------------------------------------------------------------

def test_train_batches_format_and_determinism(syn_root, tmp_path):
  pen = _penalty_folder(tmp_path / "pen")
  cfg = _cfg(syn_root, penalty=str(pen), penalty_resize=48)
  batches = _take(api.make_datasets(cfg, 32, seed=0).train_iter(3), 4)
  assert set(batches[0]) == {"image", "image_ae", "penalty"}
  for v in batches[0].values():
    assert v.shape == (3, 32, 32, 3) and v.dtype == np.float32
  assert _equal(batches, _take(api.make_datasets(cfg, 32, seed=0).train_iter(3), 4))
  assert not _equal(batches, _take(api.make_datasets(cfg, 32, seed=1).train_iter(3), 4))
  # The autoencoder input is a jittered copy of the same image, not another image.
  d = np.abs(batches[0]["image"] - batches[0]["image_ae"]).mean(axis=(1, 2, 3))
  assert np.all(d < 0.5)
  no_pen = next(api.make_datasets(_cfg(syn_root), 32, seed=0).train_iter(2))
  assert set(no_pen) == {"image", "image_ae"}


def test_iterator_state_resumes_exactly(syn_root, tmp_path):
  cfg = _cfg(syn_root, penalty=str(_penalty_folder(tmp_path / "pen")), penalty_resize=40)
  ds = api.make_datasets(cfg, 32, seed=5)
  it = ds.train_iter(2)
  _take(it, 7)  # past one epoch of 11 training images: reshuffled epochs included
  state = it.get_state()
  expected = _take(it, 5)
  resumed = ds.train_iter(2)
  resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON (checkpoints)
  assert _equal(expected, _take(resumed, 5))


def test_process_sharding_partitions_the_stream(syn_root):
  ds = api.make_datasets(_cfg(syn_root), 32, seed=0)
  whole = _take(ds.train_iter(1), 6)
  shard0, shard1 = _take(ds.train_iter(1, 0, 2), 3), _take(ds.train_iter(1, 1, 2), 3)
  assert _equal(whole[0::2], shard0) and _equal(whole[1::2], shard1)


def test_epochs_cover_training_images_only(syn_root):
  ds = api.make_datasets(_cfg(syn_root), 32, seed=0)
  train = np.stack([r["image"] for r in ds.train_eval])
  val = np.stack([r["image"] for r in ds.validation])
  seen = np.concatenate([b["image"] for b in _take(ds.train_iter(1), len(train))])
  # One epoch shows every training image once and never a validation image.
  assert sorted(map(bytes, seen)) == sorted(map(bytes, train))
  assert not {bytes(v) for v in val} & {bytes(s) for s in seen}


def test_eval_records_mvtec_ad(fixtures):
  cfg = DataConfig()
  splits = indexes.index_mvtec_ad(fixtures / "mvtec_ad/dataset", "bottle", 0)
  ds = pipeline.eval_dataset(splits.test, image_size=32, data_cfg=cfg)
  expected = json.loads((fixtures / "mvtec_ad/expected.json").read_text())
  gt_pixels = {e["path"].removesuffix(".png"): e["gt_pixels"] for e in expected["images"]}
  recs = list(ds)
  assert sorted(r["id"] for r in recs) == sorted(gt_pixels)
  for rec in recs:
    assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.float32
    assert tuple(rec["orig_size"]) == (64, 96) and rec["mask"].shape == (64, 96)
    assert rec["mask"].dtype == bool and rec["channels"] == ()
    assert rec["mask"].sum() == gt_pixels[rec["id"]]
    assert rec["mask"].any() == bool(rec["label"])
  batch = next(iter(pipeline.eval_batches(ds, 4)))
  assert batch["image"].shape == (4, 32, 32, 3) and len(batch["mask"]) == 4


def test_eval_records_loco_saturation_areas(fixtures):
  root = fixtures / "mvtec_loco/dataset"
  splits = indexes.index_mvtec_loco(root, "pushpins")
  ds = pipeline.eval_dataset(splits.test, image_size=32, data_cfg=DataConfig(),
                             specs=splits.defects_config)
  expected = json.loads((fixtures / "mvtec_loco/expected.json").read_text())
  got = {rec["id"]: rec for rec in ds}
  for image in expected["images"]:
    rec = got[f"test/{image['split']}/{image['id']}"]
    assert rec["loco_type"] == image["split"] and tuple(rec["orig_size"]) == (72, 104)
    want = [(c["defect"], c["pixel_value"], c["area"], c["saturation_area"])
            for c in image["channels"]]
    have = [(c["defect"], c["pixel_value"], c["area"], c["saturation_area"])
            for c in rec["channels"]]
    assert have == want
    union = np.zeros((72, 104), bool)
    for c in rec["channels"]:
      union |= c["mask"]
    assert np.array_equal(rec["mask"], union)


def test_loco_synthetic_make_datasets(tmp_path):
  cfg = dataclasses.replace(_cfg(tmp_path), synthetic_layout="mvtec_loco", synthetic_validation=3)
  ds = api.make_datasets(cfg, 32, seed=0)
  assert ds.info["loco"] and ds.info["num_validation"] == 3 and len(ds.info["defects_config"]) == 7
  recs = list(ds.test)
  assert {r["loco_type"] for r in recs} == {"good", "logical_anomalies", "structural_anomalies"}
  assert all(len(r["channels"]) == r["label"] for r in recs)


def test_multiprocess_workers_match_in_process(syn_root):
  cfg = _cfg(syn_root)
  ref = _take(api.make_datasets(cfg, 32, seed=0).train_iter(2), 3)
  mp = api.make_datasets(dataclasses.replace(cfg, num_workers=2), 32, seed=0).train_iter(2)
  assert _equal(ref, _take(mp, 3))


def test_penalty_element_accepts_tfds_style_records():
  # tfds.data_source('imagenette') yields {'image': uint8 [H, W, 3], 'label': ...} dicts.
  image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  out = pipeline.penalty_element({"image": image, "label": 3}, rng, image_size=16, resize_to=32,
                                 gray_prob=0.0, mean=(0, 0, 0), std=(1, 1, 1))
  full = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
  np.testing.assert_allclose(out, full[8:24, 8:24] / 255.0, atol=1e-6)
