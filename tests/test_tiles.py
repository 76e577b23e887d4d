"""Tiles (`--set model.tile=T`; efficientad_jax/tiles.py): the geometry by hand, the stitching, the training
stream's tiles, the tiled predict against an independent composition of the untiled one, and a tiny tiled
training run through evaluate, predict, the serialised export and the ONNX graph.

The tiny run also keeps grayscale first class (MVTec AD's grid, screw and zipper are single-channel): it trains
on a 16-bit grayscale PNG folder, and is evaluated and predicted on that folder and on its 8-bit copy. 16-bit
values are the 8-bit ones x 257, which the decoder scales back exactly (`preprocess.decode_image`), so both
folders must give the same training stream and the same maps, bit for bit: a 16-bit image decoded with PIL's
clipping conversion would come out saturated, and a channel mix-up would change the numbers.

The image is 96 x 128 with 64 px tiles overlapping by 16: rows start at 0 and 32 (the last moved flush with
the edge), columns at 0, 48 and 64; six tiles, overlaps of 32 and 16 px, so the blending is exercised both ways.
"""

import dataclasses
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from efficientad_jax import config as config_lib
from efficientad_jax import models, tiles
from efficientad_jax.config import Config, DataConfig, MapConfig, ModelConfig
from efficientad_jax.data import api, generate_synthetic, pipeline
from efficientad_jax.efficientad import inference, normalization, trainer
from efficientad_jax.evaluation import evaluate
from efficientad_jax.serving import backends, export, predict
from tests.test_onnx_export import random_params
from tests.test_trainer import tiny

HW, T, OVERLAP = (96, 128), 64, 16
TILING = tiles.Tiling(HW, T, OVERLAP)


# NumPy references written from tiles.py's geometry, independent of inference.cut / stitch (JAX).


def cut(tiling: tiles.Tiling, image: np.ndarray) -> np.ndarray:
  """[H, W, C] -> [count, T, T, C]."""
  t = tiling.tile
  return np.stack([image[y : y + t, x : x + t] for y, x in tiling.boxes])


def stitch(tiling: tiles.Tiling, maps: np.ndarray) -> np.ndarray:
  """[count, T, T] tile maps -> [H, W]: the window-weighted mean where tiles overlap."""
  out, weight, t = np.zeros(tiling.size), np.zeros(tiling.size), tiling.tile
  for (y, x), m in zip(tiling.boxes, maps):
    out[y : y + t, x : x + t] += tiling.window * m
    weight[y : y + t, x : x + t] += tiling.window
  return (out / weight).astype(np.float32)


# --- Geometry.


def test_tile_positions_by_hand():
  assert tiles.starts(96, 64, 16) == (0, 32)  # 0 + 48 would pass the edge: the last one sits flush at 32
  assert tiles.starts(128, 64, 16) == (0, 48, 64)
  assert tiles.starts(64, 64, 0) == (0,) and tiles.starts(128, 64, 0) == (0, 64)
  assert TILING.boxes == ((0, 0), (0, 48), (0, 64), (32, 0), (32, 48), (32, 64)) and TILING.count == 6
  np.testing.assert_allclose(tiles.ramp(8, 3), [1 / 4, 2 / 4, 3 / 4, 1, 1, 3 / 4, 2 / 4, 1 / 4])
  np.testing.assert_array_equal(tiles.ramp(8, 0), np.ones(8))
  with pytest.raises(ValueError, match="do not fit"):
    tiles.starts(48, 64, 16)


def test_stitching_gives_back_what_the_tiles_agree_on():
  """Cut a field into tiles and stitch them: the same field (every tile holds its exact values; the weights
  only decide how overlapping tiles are mixed). Different values in the overlap are blended, not cut: the
  stitched map changes gradually across the overlap."""
  field = np.random.default_rng(0).normal(size=HW).astype(np.float32)
  np.testing.assert_allclose(stitch(TILING, cut(TILING, field[..., None])[..., 0]), field, rtol=1e-6, atol=1e-6)
  assert (TILING.coverage > 0).all()
  two = tiles.Tiling((64, 112), 64, 16)  # two tiles side by side, overlapping in columns 48..63
  stitched = stitch(two, np.stack([np.zeros((64, 64)), np.ones((64, 64))]))
  row = stitched[32]
  assert (row[:48] == 0).all() and (row[64:] == 1).all()
  assert (np.diff(row[47:65]) > 0).all() and 0 < row[55] < 1  # no step: a ramp from one tile to the other
  jax_stitched = np.asarray(inference.stitch(jax.numpy.asarray(cut(TILING, field[..., None])[..., 0]), TILING))
  np.testing.assert_allclose(jax_stitched[0], field, rtol=1e-6, atol=1e-6)


def test_jax_cut_is_image_by_image_in_box_order():
  images = np.random.default_rng(1).normal(size=(2, *HW, 3)).astype(np.float32)
  tiled = np.asarray(inference.cut(jax.numpy.asarray(images), TILING))
  assert tiled.shape == (2 * TILING.count, T, T, 3)
  np.testing.assert_array_equal(tiled, np.concatenate([cut(TILING, image) for image in images]))


def test_tile_config_rules():
  ok = config_lib.override(Config(), ["model.image_size=96x128", "model.tile=64", "model.tile_overlap=16"])
  config_lib.validate(ok)
  assert ok.model.network_size == (64, 64) and tiles.from_model(ok.model) == TILING
  assert tiles.from_model(Config().model) is None and Config().model.network_size == (256, 256)
  for sets, field in (
    (["model.tile=100"], "model.tile"),  # the autoencoder's rule applies to the tile
    (["model.tile=128", "model.image_size=96x256"], "model.image_size"),  # a side smaller than the tile
    (["model.tile=64", "model.tile_overlap=64"], "model.tile_overlap"),
  ):
    with pytest.raises(config_lib.ConfigError, match=field):
      config_lib.validate(config_lib.override(Config(), sets))
  # With tiles the image size itself is free (any side >= the tile), e.g. a camera's 100 x 130.
  config_lib.validate(config_lib.override(Config(), ["model.image_size=100x130", "model.tile=64"]))


# --- The training stream.


def test_training_stream_yields_one_tile_of_both_inputs(tmp_path):
  """Each tiled element is a tile of the untiled element drawn from the same generator (jitter first), the
  same tile of 'image' and 'image_ae'; penalty crops have the tile's size."""
  cfg = DataConfig(root=str(tmp_path), synthetic_size=64, synthetic_train=6, synthetic_test=1, num_workers=0)
  cfg = dataclasses.replace(cfg, penalty=str(tmp_path / "widget" / "train" / "good"))
  whole = next(api.make_datasets(cfg, HW, 0, training=True).train_iter(4))
  tiled = next(api.make_datasets(cfg, HW, 0, training=True, tiling=TILING).train_iter(4))
  assert tiled["image"].shape == tiled["image_ae"].shape == tiled["penalty"].shape == (4, T, T, 3)
  assert whole["image"].shape == (4, *HW, 3)
  chosen = set()
  for k in range(4):
    matches = [
      b
      for b, (y, x) in enumerate(TILING.boxes)
      if np.array_equal(whole["image"][k, y : y + T, x : x + T], tiled["image"][k])
    ]
    assert matches, "a training tile is not one of the image's tiles"
    y, x = TILING.boxes[matches[0]]
    np.testing.assert_array_equal(whole["image_ae"][k, y : y + T, x : x + T], tiled["image_ae"][k])
    chosen.add(matches[0])
  element = pipeline.random_tile({"a": np.arange(96 * 128).reshape(HW)}, np.random.default_rng(3), TILING)
  assert element["a"].shape == (T, T)


# --- Inference.


@pytest.fixture(scope="module")
def detector():
  cfg = ModelConfig(image_size=HW, tile=T, tile_overlap=OVERLAP)
  nets = models.build(cfg)
  rng = np.random.default_rng(0)
  c = cfg.teacher_channels
  stats = normalization.TeacherStats(
    rng.normal(0, 0.1, c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
  )
  q = normalization.MapQuantiles(*(np.float32(v) for v in (0.0, 2.0, 0.0, 3.0)))
  return cfg, inference.Detector(random_params(nets, rng, (T, T)), stats, q)


def test_tiled_predict_equals_untiled_predict_on_each_tile_stitched(detector):
  """The tiled path against a composition of independent pieces: the untiled predict of a T x T model on each
  NumPy-cut tile (map at T x T), NumPy stitching, and the library's bilinear resize to the output size."""
  cfg, det = detector
  maps = MapConfig(pad=3)
  _, tiled = inference.compiled_predict(cfg, maps)
  _, whole = inference.compiled_predict(dataclasses.replace(cfg, image_size=(T, T), tile=0), maps)
  images = np.random.default_rng(4).normal(size=(2, *HW, 3)).astype(np.float32)
  out = tiled(det, images, out_size=(150, 200))
  h, w = models.pdn_output_size((T, T), cfg.size)
  assert out["anomaly_map"].shape == (2, 150, 200) and out["map_combined"].shape == (2, TILING.count * h, w)
  for b in range(2):
    alone = whole(det, cut(TILING, images[b]), out_size=(T, T))
    # The network-grid maps: each image's tile maps stacked along the rows, in box order.
    np.testing.assert_allclose(out["map_combined"][b], np.concatenate(alone["map_combined"]), rtol=1e-5, atol=1e-6)
    per_tile = np.asarray(alone["anomaly_map"])
    stitched = stitch(TILING, per_tile)
    expected = np.asarray(models.resize(stitched[None, ..., None], (150, 200)))[0, ..., 0]
    np.testing.assert_allclose(np.asarray(out["anomaly_map"][b]), expected, rtol=1e-5, atol=1e-5)
    assert float(out["score"][b]) == pytest.approx(expected.max(), abs=1e-5)


# --- A tiny tiled run end to end.


def gray_copy(source, target, bits: int) -> None:
  """A category with every image as 8- or 16-bit grayscale; masks copied as they are."""
  for path in source.rglob("*.png"):
    out = target / path.relative_to(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "ground_truth" in path.parts:
      shutil.copy(path, out)
      continue
    gray = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(gray if bits == 8 else gray.astype(np.uint16) * 257).save(out)  # 16: a 16-bit gray PNG


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("gray")
  generate_synthetic(root / "rgb", layout="mvtec_ad", size=64, num_train=8, num_test=2, num_validation=2)
  for bits in (8, 16):
    gray_copy(root / "rgb", root / f"gray{bits}", bits)
  assert Image.open(next((root / "gray16").rglob("train/good/*.png"))).mode.startswith("I")
  return root


def gray_config(folders, bits: int, **overrides) -> Config:
  sets = {"data.dataset": "mvtec_ad", "data.root": str(folders / f"gray{bits}"), "data.category": "widget"}
  cfg = tiny(**sets, **overrides)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))


def test_8_and_16_bit_folders_give_the_same_training_stream(folders):
  batches = [
    next(api.make_datasets(gray_config(folders, bits).data, HW, 0, training=True, tiling=TILING).train_iter(4))
    for bits in (8, 16)
  ]
  for key in ("image", "image_ae"):
    np.testing.assert_array_equal(batches[0][key], batches[1][key])
    assert (batches[0][key][..., 0] == batches[0][key][..., 2]).all()  # gray: three equal channels


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory, folders):
  """A tiny training run on the 16-bit grayscale folder at 96 x 128 in 64 px tiles."""
  run = tmp_path_factory.mktemp("tiled") / "run"
  tiled = {"model.image_size": "96x128", "model.tile": T, "model.tile_overlap": OVERLAP}
  trainer.train(gray_config(folders, 16, **tiled), run, progress=False)
  return run


def test_tiled_run_teacher_statistics_are_over_tiles(tiled_run):
  """The saved teacher statistics are the channel mean and std of the teacher over every tile of the
  training images (recomputed here with NumPy-cut tiles)."""
  model = predict.load(tiled_run)
  cfg = model.cfg
  ds = api.make_datasets(cfg.data, HW, cfg.train.seed)
  nets = models.build(cfg.model)
  feats = []
  for record in ds.train_eval:
    x = cut(TILING, record["image"])
    feats.append(np.asarray(nets.teacher.apply({"params": model.detector.params["teacher"]}, x), np.float64))
  feats = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
  np.testing.assert_allclose(model.detector.teacher_stats.mean, feats.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.detector.teacher_stats.std, feats.std(0), rtol=1e-3, atol=1e-5)


def test_tiled_run_evaluates_predicts_and_exports(tiled_run, tmp_path):
  model = predict.load(tiled_run)
  assert model.image_size == HW and model.cfg.model.tile == T
  m = evaluate.evaluate(tiled_run, out_dir=tmp_path / "eval", report=False, batch_size=4, progress=False)
  assert m["num_images"] > 0 and np.isfinite(m["decision"]["threshold"])
  image = next(pathlib.Path(model.cfg.data.root).rglob("test/*/*.png"))
  result = predict.predict_file(model, image)
  x, rgb = predict.prepare(image, model.image_size, model.inputs.mean, model.inputs.std)
  assert result.anomaly_map.shape == rgb.shape[:2]
  # The serialised export tiles inside: whole 96 x 128 images in, the same maps out.
  loaded = export.load_exported(export.export_model(tiled_run, tmp_path / "m.eadx", platforms=("cpu",)))
  images = np.random.default_rng(5).normal(size=(2, *HW, 3)).astype(np.float32)
  ref = model.predict_fn(model.detector, images, out_size=HW)
  np.testing.assert_allclose(np.asarray(loaded(images)["anomaly_map"]), np.asarray(ref["anomaly_map"]), atol=1e-5)
  # The ONNX graph cuts and stitches the tiles itself (onnxruntime), and the graph backends use its map.
  pytest.importorskip("onnxruntime")
  runner = backends.make(model, "onnxruntime")
  got = runner(images, out_size=(120, 160))
  want = model.predict_fn(model.detector, images, out_size=(120, 160))
  np.testing.assert_allclose(got["anomaly_map"], np.asarray(want["anomaly_map"]), rtol=0, atol=1e-4)
  np.testing.assert_allclose(got["score"], np.asarray(want["score"]), rtol=0, atol=1e-4)


def test_tiled_run_on_16_bit_evaluates_and_predicts_8_bit_alike(tiled_run, folders, tmp_path):
  model = predict.load(tiled_run)
  results = {}
  for bits in (16, 8):
    cfg = config_lib.override(model.cfg, [f"data.root={folders / f'gray{bits}'}"])
    results[bits] = evaluate.evaluate(tiled_run, cfg=cfg, out_dir=tmp_path / f"e{bits}", report=False, progress=False)
  assert results[8]["metrics"] == results[16]["metrics"]
  for path16 in sorted((folders / "gray16" / "widget" / "test").rglob("*.png"))[:3]:
    a = predict.predict_file(model, path16)
    b = predict.predict_file(model, folders / "gray8" / path16.relative_to(folders / "gray16"))
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.anomaly_map.shape == (64, 64) and a.rgb.shape == (64, 64, 3)
