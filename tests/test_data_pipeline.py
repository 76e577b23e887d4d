"""Preprocessing and grain pipelines: conversions, jitter, penalty, determinism, resume (docs/method.md §4)."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from efficientad_jax.data import api, indexes, pipeline, preprocess, records
from tests import fixture_sets


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
      sub / f"{i}.{'jpg' if i % 2 else 'png'}"
    )
  return path


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
  np.testing.assert_allclose(y[0, 0], (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-6)
  assert y.dtype == np.float32


# --- colour jitter and penalty ----------------------------------------------------------------


def _blend(x, degenerate, factor):
  """PIL.ImageEnhance by hand: degenerate + f * (x - degenerate) in float32, truncated to uint8."""
  out = degenerate + np.float32(factor) * (x.astype(np.float32) - degenerate)
  return np.clip(np.floor(out), 0, 255).astype(np.uint8)


def test_jitter_ops_follow_pil_semantics():
  x = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  luma = np.asarray(Image.fromarray(x).convert("L")).astype(np.float32)[..., None]
  for f in (0.8, 1.17):
    assert np.array_equal(preprocess.adjust_color(x, "brightness", f), _blend(x, np.float32(0), f))
    mean = np.float32(int(luma.mean() + 0.5))  # PIL's Contrast: the rounded mean of the L image
    assert np.array_equal(preprocess.adjust_color(x, "contrast", f), _blend(x, mean, f))
    assert np.array_equal(preprocess.adjust_color(x, "saturation", f), _blend(x, luma, f))
  assert np.array_equal(preprocess.adjust_color(x, "saturation", 1.0), x)
  with pytest.raises(ValueError, match="colour jitter kind"):
    preprocess.adjust_color(x, "hue", 1.0)


def test_jitter_draw_statistics():
  rng = np.random.default_rng(0)
  draws = [preprocess.draw_jitter(rng, 0.8, 1.2) for _ in range(1200)]
  kinds = [k for k, _ in draws]
  factors = np.array([f for _, f in draws])
  for kind in preprocess.JITTER_KINDS:
    assert 0.28 < kinds.count(kind) / len(kinds) < 0.39  # one of three ops, uniformly
  assert factors.min() >= 0.8 and factors.max() <= 1.2
  assert abs(factors.mean() - 1.0) < 0.02 and abs(factors.std() - 0.4 / 12**0.5) < 0.01  # U(0.8, 1.2)


def test_train_element_jitters_the_full_resolution_image(tmp_path):
  """'image_ae' = the drawn jitter on the decoded image, then the resize (the reference's order)."""
  rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "x.png")
  sample = records.Sample(image=str(tmp_path / "x.png"), id="train/good/x", label=0, defect="good")
  for seed in range(6):
    out = pipeline.train_element(sample, np.random.default_rng(seed), 32, (0.8, 1.2))
    kind, factor = preprocess.draw_jitter(np.random.default_rng(seed), 0.8, 1.2)
    assert out["image"].dtype == out["image_ae"].dtype == np.uint8  # normalised in the jitted step
    np.testing.assert_array_equal(out["image"], preprocess.resize(rgb, 32))
    np.testing.assert_array_equal(out["image_ae"], preprocess.resize(preprocess.adjust_color(rgb, kind, factor), 32))
    np.testing.assert_array_equal(  # the float input of the preprocessing fixtures, from the same bytes
      preprocess.normalize(preprocess.to_float(out["image_ae"]), IMAGENET_MEAN, IMAGENET_STD),
      preprocess.autoencoder_input(rgb, kind, factor, 32, IMAGENET_MEAN, IMAGENET_STD),
    )


def test_jitter_tables_are_pil_image_enhance_byte_for_byte():
  """Brightness and contrast run as per-value tables (`Image.point`): the bytes of ImageEnhance's blend, on
  random images (also low-contrast ones) and factors, including the ends of U(0.8, 1.2), 0, 1 and 2."""
  from PIL import ImageEnhance

  enhancers = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
  }
  rng = np.random.default_rng(0)
  for trial in range(60):
    image = rng.integers(0, 256, (*rng.integers(1, 40, 2), 3), dtype=np.uint8)
    if trial % 3 == 0:
      image = (image // 4 + rng.integers(0, 190)).astype(np.uint8)
    for kind in preprocess.JITTER_KINDS:
      factor = float(rng.choice([0.8, 1.2, 0.0, 1.0, 2.0])) if trial % 4 == 0 else float(rng.uniform(0, 2.5))
      expected = np.asarray(enhancers[kind](Image.fromarray(image)).enhance(factor))
      np.testing.assert_array_equal(preprocess.adjust_color(image, kind, factor), expected, err_msg=f"{kind} {factor}")
  with pytest.raises(ValueError, match="jitter kind"):
    preprocess.adjust_color(image, "hue", 1.0)


def test_penalty_image_shape_and_grayscale():
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  grays = 0
  for _ in range(200):
    out = preprocess.penalty_image(image, rng, 64, 32, 0.3, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    raw = out * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)
    grays += np.allclose(raw[..., 0], raw[..., 1], atol=1e-5) and np.allclose(raw[..., 1], raw[..., 2], atol=1e-5)
  assert 0.2 < grays / 200 < 0.4
  # The centre crop of the resized image, exactly.
  full = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
  never_gray = preprocess.penalty_image(image, rng, 64, 32, 0.0, (0, 0, 0), (1, 1, 1))
  np.testing.assert_allclose(never_gray, full[16:48, 16:48] / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match="larger than penalty_resize"):
    preprocess.penalty_image(image, rng, 16, 32, 0.3, IMAGENET_MEAN, IMAGENET_STD)
  # The drawn decision feeds the pure transform: the same generator state gives the same image.
  for seed in range(4):
    gray = np.random.default_rng(seed).uniform() < 0.3
    np.testing.assert_array_equal(
      preprocess.penalty_image(image, np.random.default_rng(seed), 64, 32, 0.3, IMAGENET_MEAN, IMAGENET_STD),
      preprocess.penalty_transform(image, gray, 64, 32, IMAGENET_MEAN, IMAGENET_STD),
    )


# --- pipelines --------------------------------------------------------------------------------


def test_train_batches_format_and_determinism(syn_root, tmp_path):
  pen = _penalty_folder(tmp_path / "pen")
  cfg = _cfg(syn_root, penalty=str(pen), penalty_resize=48)
  batches = _take(api.make_datasets(cfg, 32, seed=0).train_iter(3), 4)
  assert set(batches[0]) == {"image", "image_ae", "penalty"}
  for v in batches[0].values():
    assert v.shape == (3, 32, 32, 3) and v.dtype == np.uint8  # normalised in the jitted step
  assert _equal(batches, _take(api.make_datasets(cfg, 32, seed=0).train_iter(3), 4))
  assert not _equal(batches, _take(api.make_datasets(cfg, 32, seed=1).train_iter(3), 4))
  # The autoencoder input is a jittered copy of the same image, not another image.
  d = np.abs(batches[0]["image"].astype(float) - batches[0]["image_ae"]).mean(axis=(1, 2, 3))
  assert np.all(d < 0.5 * 255 * 0.226)  # half a standard deviation of the normalised input
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
  to_input = lambda b: preprocess.normalize(preprocess.to_float(b["image"]), IMAGENET_MEAN, IMAGENET_STD)
  train = np.stack([r["image"] for r in ds.train_eval])
  val = np.stack([r["image"] for r in ds.validation])
  seen = np.concatenate([to_input(b) for b in _take(ds.train_iter(1), len(train))])
  # One epoch shows every training image once and never a validation image.
  assert sorted(map(bytes, seen)) == sorted(map(bytes, train))
  assert not {bytes(v) for v in val} & {bytes(s) for s in seen}


def test_eval_records_mvtec_ad(fixtures):
  cfg = DataConfig()
  ad = fixture_sets.mvtec_ad(fixtures)
  splits = indexes.index_mvtec_ad(ad.root, ad.category, 0)
  ds = pipeline.eval_dataset(splits.test, image_size=32, data_cfg=cfg)
  gt_pixels = {e["path"].removesuffix(".png"): e["gt_pixels"] for e in ad.doc["images"]}
  recs = list(ds)
  assert sorted(r["id"] for r in recs) == sorted(gt_pixels)
  for rec in recs:
    assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.float32
    assert tuple(rec["orig_size"]) == ad.size_hw and rec["mask"].shape == ad.size_hw
    assert rec["mask"].dtype == bool and rec["channels"] == ()
    assert rec["mask"].sum() == gt_pixels[rec["id"]]
    assert rec["mask"].any() == bool(rec["label"])
  batch = next(iter(pipeline.eval_batches(ds, 4)))
  assert batch["image"].shape == (4, 32, 32, 3) and len(batch["mask"]) == 4


def test_eval_records_loco_saturation_areas(fixtures):
  loco = fixture_sets.mvtec_loco(fixtures)
  splits = indexes.index_mvtec_loco(loco.root, loco.category)
  ds = pipeline.eval_dataset(splits.test, image_size=32, data_cfg=DataConfig(), specs=splits.defects_config)
  got = {rec["id"]: rec for rec in ds}
  assert len(got) == len(loco.doc["images"])
  for image in loco.doc["images"]:
    rec = got[f"test/{image['split']}/{image['id']}"]
    assert rec["loco_type"] == image["split"] and tuple(rec["orig_size"]) == loco.size_hw
    want = [(c["defect"], c["pixel_value"], c["area"], c["saturation_area"]) for c in image["channels"]]
    have = [(c["defect"], c["pixel_value"], c["area"], c["saturation_area"]) for c in rec["channels"]]
    assert have == want
    union = np.zeros(loco.size_hw, bool)
    for c in rec["channels"]:
      union |= c["mask"]
    assert np.array_equal(rec["mask"], union)


def test_loco_synthetic_make_datasets(tmp_path):
  cfg = dataclasses.replace(_cfg(tmp_path), synthetic_layout="mvtec_loco", synthetic_validation=3)
  ds = api.make_datasets(cfg, 32, seed=0)
  assert ds.info.loco and ds.info.num_validation == 3 and len(ds.info.defects_config) == 7
  recs = list(ds.test)
  assert {r["loco_type"] for r in recs} == {"good", "logical_anomalies", "structural_anomalies"}
  assert all(len(r["channels"]) == r["label"] for r in recs)


def test_multiprocess_workers_match_in_process(syn_root):
  # Reference: decoded from the files in this process. Workers: spawned processes that receive the decode
  # cache pickled (its path) and map its file themselves (data/cache.py).
  cfg = _cfg(syn_root)
  ref = _take(api.make_datasets(dataclasses.replace(cfg, decode_cache=False), 32, seed=0).train_iter(2), 3)
  ds = api.make_datasets(dataclasses.replace(cfg, num_workers=2), 32, seed=0, training=True)
  assert ds.info.decoded_once
  assert _equal(ref, _take(ds.train_iter(2), 3))


def test_penalty_element_accepts_tfds_style_records():
  # tfds.data_source('imagenette') yields {'image': uint8 [H, W, 3], 'label': ...} dicts.
  image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  rng = np.random.default_rng(0)
  out = pipeline.penalty_element({"image": image, "label": 3}, rng, image_size=16, resize_to=32, gray_prob=0.0)
  full = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(out, full[8:24, 8:24])
