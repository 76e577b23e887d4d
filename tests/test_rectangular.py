"""Rectangular inputs (`--set model.image_size=HxW`): the size's parsing and rule, the data pipeline, the
autoencoder against PyTorch, and a saved model through evaluate, predict and the serialised export.

The size used, 64 x 96, is the smallest rectangle the autoencoder accepts; anything that swapped H and W, or
used one side for both, would change a shape or a number here (the ONNX graph at this size is in
test_onnx_export.py).
"""

import dataclasses
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from efficientad_jax import config as config_lib
from efficientad_jax import models
from efficientad_jax.config import Config, DataConfig, ImageSize, ModelConfig
from efficientad_jax.data import api, preprocess
from efficientad_jax.efficientad import inference, normalization
from efficientad_jax.evaluation import evaluate
from efficientad_jax.serving import export, predict, saved_model
from tests.test_onnx_export import random_params

HW = (64, 96)


# --- The size itself.


@pytest.mark.parametrize(
  "value, expected",
  [(256, (256, 256)), ("256", (256, 256)), ("192x384", (192, 384)), ("192X384", (192, 384)), ([64, 96], (64, 96))],
)
def test_image_size_forms(value, expected):
  size = ImageSize(value)
  assert size == expected and isinstance(size, tuple)
  assert str(size) == (f"{expected[0]}" if expected[0] == expected[1] else f"{expected[0]}x{expected[1]}")
  assert pickle.loads(pickle.dumps(size)) == size and type(pickle.loads(pickle.dumps(size))) is ImageSize


def test_image_size_in_configs():
  cfg = config_lib.override(Config(), ["model.image_size=192x384"])
  assert cfg.model.image_size == (192, 384)
  saved = json.loads(config_lib.to_json(cfg))
  assert saved["model"]["image_size"] == [192, 384]  # JSON: [H, W]
  assert config_lib.from_dict(Config, saved) == cfg
  old = {**saved, "model": {**saved["model"], "image_size": 256}}  # configs saved before: one int
  assert config_lib.from_dict(Config, old).model.image_size == (256, 256)
  assert ModelConfig(image_size=256) == ModelConfig()  # 256 is the default square
  with pytest.raises(config_lib.ConfigError, match=r"model.image_size: image size '192by384': give S or HxW"):
    config_lib.override(Config(), ["model.image_size=192by384"])


@pytest.mark.parametrize(
  "value, nearest",
  [("200x384", "nearest valid 192x384 or 224x384"), ("64x100", "nearest valid 64x96 or 64x128"), ("48", "64")],
)
def test_invalid_sizes_name_the_nearest_valid_ones(value, nearest):
  with pytest.raises(config_lib.ConfigError, match=f"model.image_size = {value}.*{nearest}"):
    config_lib.validate(config_lib.override(Config(), [f"model.image_size={value}"]))
  penalty = config_lib.override(Config(), ["model.image_size=192x384", "data.penalty_resize=256"])
  with pytest.raises(config_lib.ConfigError, match="data.penalty_resize"):
    config_lib.validate(penalty)  # the crop's longer side, 384, does not fit a 256 square


# --- Data.


def test_resize_and_penalty_crop_by_hand():
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  resized = preprocess.resize(image, HW)
  assert resized.shape == (*HW, 3)
  np.testing.assert_array_equal(resized, np.asarray(Image.fromarray(image).resize((96, 64), Image.BILINEAR)))
  crop = preprocess.penalty_crop(image, False, 128, HW)
  full = np.asarray(Image.fromarray(image).resize((128, 128), Image.BILINEAR))
  np.testing.assert_array_equal(crop, full[32:96, 16:112])  # centred: (128 - 64) / 2, (128 - 96) / 2


def test_training_stream_with_and_without_the_decode_cache(tmp_path):
  """The cached stream (resized copies at H x W in the mapped file) equals the one that decodes each time."""
  cfg = DataConfig(root=str(tmp_path), synthetic_size=40, synthetic_train=6, synthetic_test=1, num_workers=0)
  batches = []
  for cache in (True, False):
    data = api.make_datasets(dataclasses.replace(cfg, decode_cache=cache), HW, 0, training=True)
    assert data.info.decoded_once == cache
    batches.append(next(data.train_iter(2)))
  for key in ("image", "image_ae"):
    assert batches[0][key].shape == (2, *HW, 3)
    np.testing.assert_array_equal(batches[0][key], batches[1][key])


# --- The autoencoder against PyTorch.


def torch_autoencoder_forward(params: dict, x: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
  """The autoencoder written in PyTorch from the paper's description (docs/method.md §3), the decoder's sizes
  per side by anomalib's rule (n // 64 - 1, n // 32, n // 16 - 1, n // 8, n // 4 - 1, n // 2 - 1, at least 1)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
  conv = lambda x, p, stride, pad: F.conv2d(x, t(p["kernel"]).permute(3, 2, 0, 1), t(p["bias"]), stride, pad)
  h, w = x.shape[1:3]
  rule = lambda n: [max(1, s) for s in (n // 64 - 1, n // 32, n // 16 - 1, n // 8, n // 4 - 1, n // 2 - 1)]
  sizes = list(zip(rule(h), rule(w)))
  y = t(x).permute(0, 3, 1, 2)
  for i in range(1, 6):
    y = F.relu(conv(y, params[f"enc{i}"], 2, 1))
  y = conv(y, params["enc6"], 1, 0)  # the bottleneck spans the whole (h / 32, w / 32) grid
  assert tuple(y.shape[2:]) == (1, 1)
  for i in range(1, 7):
    y = F.interpolate(y, size=sizes[i - 1], mode="bilinear", align_corners=False)
    y = F.relu(conv(y, params[f"dec{i}"], 1, 2))
  y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
  y = F.relu(conv(y, params["dec7"], 1, 1))
  y = conv(y, params["dec8"], 1, 1)
  return y.permute(0, 2, 3, 1).numpy()


def test_autoencoder_matches_pytorch_at_a_rectangular_size():
  cfg = ModelConfig(image_size=HW, teacher_channels=16)
  nets = models.build(cfg)
  params = random_params(nets, np.random.default_rng(0), HW)["autoencoder"]
  x = np.random.default_rng(1).normal(size=(2, *HW, 3)).astype(np.float32)
  ours = np.asarray(nets.autoencoder.apply({"params": params}, x))
  out_size = models.pdn_output_size(HW, cfg.size)
  assert ours.shape == (2, *out_size, 16) and out_size[0] < out_size[1]
  np.testing.assert_allclose(ours, torch_autoencoder_forward(params, x, out_size), rtol=1e-4, atol=1e-5)


# --- A saved model at 64 x 96 through evaluate, predict and the export.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A saved model with random networks on the synthetic set (square 64 px images, shown to it as 64 x 96)."""
  from efficientad_jax.data import generate_synthetic

  root = tmp_path_factory.mktemp("rect")
  generate_synthetic(root / "data", layout="mvtec_ad", size=64, num_train=4, num_test=2, num_validation=2)
  cfg = Config(
    model=ModelConfig(image_size=HW), data=DataConfig(dataset="mvtec_ad", root=str(root / "data"), category="widget")
  )
  nets = models.build(cfg.model)
  ds = api.make_datasets(cfg.data, cfg.model.image_size, seed=0)
  stats = normalization.TeacherStats.identity(cfg.model.teacher_channels)
  detector, threshold, scores = inference.calibrate(
    cfg, random_params(nets, np.random.default_rng(2), HW), stats, ds.validation, 4
  )
  meta = {
    "config": config_lib.to_dict(cfg),
    "threshold": threshold,
    "validation_scores": scores,
    "image_size": list(HW),
    "model_size": "small",
    "teacher": "random",
    "steps": 0,
  }
  saved_model.save(root / "run" / "model", "efficientad", detector, meta)
  return root / "run"


def test_evaluate_and_predict_give_maps_at_each_image_size(run, tmp_path):
  model = predict.load(run)
  assert model.image_size == HW and isinstance(model.image_size, ImageSize)
  m = evaluate.evaluate(run, out_dir=tmp_path / "eval", report=False, batch_size=4, progress=False)
  assert m["num_images"] > 0 and m["model"]["image_size"] == HW
  record = next(iter(api.make_datasets(model.cfg.data, HW, seed=0).test))
  assert record["image"].shape == (*HW, 3)
  path = run.parent / "data" / "widget" / f"{record['id']}.png"
  wide = tmp_path / "wide.png"
  Image.open(path).resize((150, 40)).save(wide)  # W x H: another aspect than the model's
  result = predict.predict_file(model, wide)
  assert result.anomaly_map.shape == (40, 150) and result.score == pytest.approx(result.anomaly_map.max())
  x, _ = predict.prepare(wide, model.image_size, model.inputs.mean, model.inputs.std)
  ref = model.predict_fn(model.detector, x[None], out_size=(40, 150))
  np.testing.assert_array_equal(result.anomaly_map, np.asarray(ref["anomaly_map"][0]))


def test_serialised_export_takes_the_rectangular_input(run, tmp_path):
  model = predict.load(run)
  path = export.export_model(run, tmp_path / "m.eadx", platforms=("cpu",))
  loaded = export.load_exported(path)
  assert loaded.image_size == HW and loaded.meta["output_size"] == list(HW)
  x = np.random.default_rng(3).normal(size=(3, *HW, 3)).astype(np.float32)
  out = loaded(x)
  ref = model.predict_fn(model.detector, x, out_size=HW)
  assert out["anomaly_map"].shape == (3, *HW)
  np.testing.assert_allclose(np.asarray(out["anomaly_map"]), np.asarray(ref["anomaly_map"]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, 64, 96, 3\]"):
    loaded(x.transpose(0, 2, 1, 3))  # W x H: refused, not silently run
