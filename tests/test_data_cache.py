"""The decode cache: training images decoded once into a memory-mapped file (data/cache.py; docs/method.md §4.1)."""

import collections
import dataclasses
import gc
import multiprocessing
import os
import pickle
import tempfile
import time

import jax
import numpy as np
import pytest
from PIL import Image

from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from efficientad_jax.data import (
  api,
  cache,
  indexes,
  pipeline,
  preprocess,
  records,
  synthetic,
)
from efficientad_jax.data.records import DataError
from tests import fixture_sets
from tests.test_data_pipeline import _cfg, _equal, _penalty_folder, _take
from tests.test_data_tfds import _same_records

SIZES = ((20, 30), (33, 17), (16, 16), (9, 40))


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
  """The system temp dir of `tempfile.mkdtemp`, here a fresh folder to look into."""
  folder = tmp_path / "system_tmp"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  return folder


@pytest.fixture
def samples(tmp_path):
  """Training records of different sizes and modes (RGB, grayscale, RGBA)."""
  rng = np.random.default_rng(0)
  out = []
  for i, (h, w) in enumerate(SIZES):
    channels = (3, 1, 4, 3)[i]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(tmp_path / f"{i}.png")
    out.append(records.Sample(image=str(tmp_path / f"{i}.png"), id=f"train/good/{i}", label=0, defect="good"))
  return out


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic_cache")


def _read_full(decoded, index):
  return decoded.full(index).copy()


def _empty_soon(folder, seconds=5.0):
  """Whether `folder` becomes empty: a grain iterator's prefetch threads drop their references to the
  dataset (and its cache) a moment after the iterator is dropped."""
  deadline = time.monotonic() + seconds
  while True:
    gc.collect()
    if not list(folder.iterdir()):
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)


def test_round_trip_of_records_of_different_sizes(samples, temp_dir):
  decoded = cache.decode_once(samples, 12)
  assert len(decoded) == len(SIZES) and decoded.shapes == SIZES and decoded.size == (12, 12)
  assert os.path.dirname(decoded.path).startswith(str(temp_dir / "efficientad_decoded_"))
  assert os.path.getsize(decoded.path) == decoded.nbytes == 4 * 12 * 12 * 3 + sum(h * w * 3 for h, w in SIZES)
  for i, sample in enumerate(samples):
    rgb = preprocess.decode_image(sample.image)
    assert decoded.full(i).dtype == np.uint8 and np.array_equal(decoded.full(i), rgb)
    assert np.array_equal(decoded.small(i), preprocess.resize(rgb, 12))
    # The cached resize, normalised, is the network input of the file, bit for bit.
    assert np.array_equal(
      preprocess.normalize(preprocess.to_float(decoded.small(i)), IMAGENET_MEAN, IMAGENET_STD),
      preprocess.model_input(rgb, 12, IMAGENET_MEAN, IMAGENET_STD),
    )
  assert not decoded.full(0).flags.writeable


def test_tfds_style_records(samples, temp_dir):
  # TFDS records are dicts whose 'image' is an array (or encoded bytes).
  rgb = preprocess.decode_image(samples[0].image)
  tfds = [
    {"image": rgb, "id": b"a", "label": 0, "defect": b"good"},
    {"image": open(samples[1].image, "rb").read(), "id": b"b", "label": 0, "defect": b"good"},
  ]
  decoded = cache.decode_once(tfds, 8)
  assert np.array_equal(decoded.full(0), rgb)
  assert np.array_equal(decoded.full(1), preprocess.decode_image(samples[1].image))


def test_pickles_small_and_reopens_in_a_spawned_process(samples, temp_dir):
  decoded = cache.decode_once(samples, 12)
  decoded.full(0)  # mapped here: the mapping must not travel
  assert len(pickle.dumps(decoded)) < 600
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    got = pool.apply(_read_full, (decoded, 1))
  assert np.array_equal(got, decoded.full(1))
  assert os.path.exists(decoded.path)  # the worker's copy never deletes the file


def test_folder_removed_with_its_owner_only(samples, temp_dir):
  decoded = cache.decode_once(samples, 12)
  folder = os.path.dirname(decoded.path)
  copy = pickle.loads(pickle.dumps(decoded))
  del copy
  gc.collect()
  assert os.path.exists(decoded.path)
  del decoded
  gc.collect()
  assert not os.path.exists(folder) and not list(temp_dir.iterdir())


def test_datasets_own_their_cache(syn_root, temp_dir):
  ds = api.make_datasets(_cfg(syn_root), 32, seed=0, training=True)
  assert ds.info.decoded_once and len(list(temp_dir.iterdir())) == 1
  next(ds.train_iter(2))
  next(ds.train_iter(2))
  assert len(list(temp_dir.iterdir())) == 1  # one cache for every train_iter
  del ds
  assert _empty_soon(temp_dir)
  # Evaluation builds none; decode_cache=false never does.
  assert not api.make_datasets(_cfg(syn_root), 32, seed=0).info.decoded_once
  off = api.make_datasets(_cfg(syn_root, decode_cache=False), 32, seed=0, training=True)
  next(off.train_iter(2))
  assert not off.info.decoded_once and not list(temp_dir.iterdir())


@pytest.mark.parametrize("with_penalty", [False, True])
def test_stream_is_the_same_with_and_without_the_cache(syn_root, tmp_path, with_penalty):
  extra = {"penalty": str(_penalty_folder(tmp_path / "pen")), "penalty_resize": 40} if with_penalty else {}
  on = api.make_datasets(_cfg(syn_root, **extra), 32, seed=3, training=True)
  off = api.make_datasets(_cfg(syn_root, decode_cache=False, **extra), 32, seed=3, training=True)
  assert on.info.decoded_once and not off.info.decoded_once
  cached, decoded = _take(on.train_iter(3), 6), _take(off.train_iter(3), 6)  # past an epoch of 10 images
  assert set(cached[0]) == ({"image", "image_ae", "penalty"} if with_penalty else {"image", "image_ae"})
  assert _equal(cached, decoded)
  assert _equal(_take(on.train_iter(1, 1, 2), 4), _take(off.train_iter(1, 1, 2), 4))


def test_train_eval_from_the_cache_equals_the_decoded_one(syn_root):
  on = list(api.make_datasets(_cfg(syn_root), 32, seed=0, training=True).train_eval)
  off = list(api.make_datasets(_cfg(syn_root, decode_cache=False), 32, seed=0, training=True).train_eval)
  assert len(on) == len(off) == 10
  for a, b in zip(on, off):
    assert a.keys() == b.keys()
    for key in a:
      assert np.array_equal(a[key], b[key]) if isinstance(a[key], np.ndarray) else a[key] == b[key], key


def test_tfds_records_through_the_cache(fixtures, tmp_path):
  ad = fixture_sets.mvtec_ad(fixtures)
  cfg = DataConfig(
    dataset="mvtec_ad", root=str(ad.root), category=ad.category, source="tfds", tfds_data_dir=str(tmp_path / "tfds")
  )
  on = api.make_datasets(cfg, 24, seed=0, training=True)
  off = api.make_datasets(dataclasses.replace(cfg, decode_cache=False), 24, seed=0, training=True)
  assert on.info.decoded_once
  _same_records(on.train_eval, off.train_eval)
  assert _equal(_take(on.train_iter(2), 3), _take(off.train_iter(2), 3))


def test_cache_must_match_the_split(samples, temp_dir):
  decoded = cache.decode_once(samples, 12)
  with pytest.raises(ValueError, match="does not match"):
    pipeline.train_dataset(samples, None, image_size=16, batch_size=1, seed=0, data_cfg=DataConfig(), cache=decoded)


def test_too_small_temp_disk_names_the_folder_and_the_fix(samples, temp_dir, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
  with pytest.raises(DataError) as error:
    cache.decode_once(samples, 12)
  message = str(error.value)
  assert "\n" not in message and str(temp_dir / "efficientad_decoded_") in message
  assert "TMPDIR" in message and "--set data.decode_cache=false" in message
  assert f"{4 * 12 * 12 * 3 + sum(h * w * 3 for h, w in SIZES)} bytes" in message
  assert not list(temp_dir.iterdir())  # nothing left behind


def test_corrupt_training_image_fails_when_training_starts(tmp_path, temp_dir):
  base = synthetic.generate_synthetic(tmp_path / "data", size=24, num_train=6, num_test=1)
  cfg = DataConfig(dataset="mvtec_ad", root=str(base.parent), category=base.name)
  bad = indexes.index_mvtec_ad(base.parent, base.name, 0, cfg.validation_fraction).train[2].image
  with open(bad, "r+b") as f:
    f.truncate(60)  # a truncated PNG: its header still reads
  api.make_datasets(cfg, 16, seed=0)  # evaluation decodes no training image
  with pytest.raises(DataError, match=f"{bad}: corrupt.*replace or remove the file"):
    api.make_datasets(cfg, 16, seed=0, training=True)
  assert not list(temp_dir.iterdir())


def test_worker_count_rules(monkeypatch):
  assert pipeline.worker_count(0) == 0 and pipeline.worker_count(3) == 3  # as requested
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert pipeline.worker_count(-1) == 0  # the CPU runs XLA's step
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for cores, expected in ((1, 0), (2, 1), (8, 7), (64, pipeline.MAX_AUTO_WORKERS)):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
    assert pipeline.worker_count(-1) == expected
  with pytest.raises(ValueError, match="num_workers"):
    pipeline.worker_count(-2)
