"""Grayscale stays first class (MVTec AD's grid, screw and zipper are single-channel): the same category as 8-bit
and as 16-bit grayscale PNG folders, through training, evaluation and predict.

16-bit values are the 8-bit ones x 257, which the decoder scales back exactly (`preprocess.decode_image`), so
both folders must give the same training stream and the same maps, bit for bit: a 16-bit image decoded with
PIL's clipping conversion instead would come out saturated, and a channel mix-up would change the numbers.
"""

import dataclasses
import shutil

import numpy as np
import pytest
from PIL import Image

from efficientad_jax import config as config_lib
from efficientad_jax.data import api, generate_synthetic
from efficientad_jax.efficientad import trainer
from efficientad_jax.evaluation import evaluate
from efficientad_jax.serving import predict
from tests.test_trainer import tiny


def gray_copy(source, target, bits: int) -> None:
  """The synthetic category with every image as 8- or 16-bit grayscale; masks copied as they are."""
  for path in source.rglob("*.png"):
    out = target / path.relative_to(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "ground_truth" in path.parts:
      shutil.copy(path, out)
      continue
    gray = np.asarray(Image.open(path).convert("L"))
    if bits == 8:
      Image.fromarray(gray).save(out)
    else:
      Image.fromarray(gray.astype(np.uint16) * 257).save(out)  # PIL writes a 16-bit grayscale PNG


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("gray")
  generate_synthetic(root / "rgb", layout="mvtec_ad", size=64, num_train=8, num_test=2, num_validation=2)
  for bits in (8, 16):
    gray_copy(root / "rgb", root / f"gray{bits}", bits)
  assert Image.open(next((root / "gray16").rglob("train/good/*.png"))).mode.startswith("I")
  return root


def config(folders, bits: int):
  cfg = tiny(**{"data.dataset": "mvtec_ad", "data.root": str(folders / f"gray{bits}"), "data.category": "widget"})
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))


def test_8_and_16_bit_folders_give_the_same_training_stream(folders):
  batches = [next(api.make_datasets(config(folders, b).data, 64, 0, training=True).train_iter(4)) for b in (8, 16)]
  for key in ("image", "image_ae"):
    np.testing.assert_array_equal(batches[0][key], batches[1][key])
    assert (batches[0][key][..., 0] == batches[0][key][..., 2]).all()  # gray: three equal channels


def test_train_on_16_bit_then_evaluate_and_predict_both(folders, tmp_path):
  run = tmp_path / "run"
  trainer.train(config(folders, 16), run, progress=False)
  model = predict.load(run)
  results = {}
  for bits in (16, 8):
    cfg = config_lib.override(model.cfg, [f"data.root={folders / f'gray{bits}'}"])
    results[bits] = evaluate.evaluate(run, cfg=cfg, out_dir=tmp_path / f"eval{bits}", report=False, progress=False)
  assert results[8]["metrics"] == results[16]["metrics"]
  for path16 in sorted((folders / "gray16" / "widget" / "test").rglob("*.png"))[:3]:
    path8 = folders / "gray8" / path16.relative_to(folders / "gray16")
    a, b = predict.predict_file(model, path16), predict.predict_file(model, path8)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.anomaly_map.shape == (64, 64) and a.rgb.shape == (64, 64, 3)
