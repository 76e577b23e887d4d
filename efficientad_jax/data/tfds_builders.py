"""TFDS builders for MVTec AD, MVTec LOCO AD and VisA, written and read WITHOUT TensorFlow (docs/method.md §4.3).

Manual download: point `manual_dir` (`DataConfig.root`) at the extracted archive (the folder
holding `<category>/`, or VisA's `split_csv/`). One BuilderConfig per category. The builders reuse
the file indexes (`indexes.py`), so both paths list the same images with the same ids and checks.

Records (array_record, read back with `tfds.data_source`) keep the original files' bytes, so they
decode through the same `preprocess.decode_image` as the folder path (tfds' own Image feature would
re-encode JPEGs and, for numpy inputs, needs TensorFlow):
  'image': bytes (original file), 'id': str, 'label': int, 'defect': str, 'loco_type': str,
  'height', 'width': int (original size), 'mask': bytes ('' for none),
  LOCO: 'channels': [bytes] one PNG per defect, 'channel_defects': [str], 'channel_areas': [int],
  'channel_saturation_areas': [float], 'defects_config': str (the object's JSON).
Splits: MVTec AD and VisA 'train' (all normals; the seeded validation hold-out is applied when
loading, `load_splits`) and 'test'; LOCO 'train', 'validation', 'test'.

Build on first use (`load_splits`), cached in data_dir; tfds writes into an `incomplete.*` folder
and renames it when done, and removes it when the build fails, so a failed build leaves no cache.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from efficientad_jax.data import indexes, preprocess, records
from efficientad_jax.data.records import DataError

MVTEC_AD = (
  "bottle",
  "cable",
  "capsule",
  "carpet",
  "grid",
  "hazelnut",
  "leather",
  "metal_nut",
  "pill",
  "screw",
  "tile",
  "toothbrush",
  "transistor",
  "wood",
  "zipper",
)
MVTEC_LOCO = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
VISA = (
  "candle",
  "capsules",
  "cashew",
  "chewinggum",
  "fryum",
  "macaroni1",
  "macaroni2",
  "pcb1",
  "pcb2",
  "pcb3",
  "pcb4",
  "pipe_fryum",
)

_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)


def _features(loco: bool) -> tfds.features.FeaturesDict:
  feats = {
    "image": _BYTES(),
    "id": tfds.features.Text(),
    "label": tfds.features.Scalar(np.int64),
    "defect": tfds.features.Text(),
    "loco_type": tfds.features.Text(),
    "height": tfds.features.Scalar(np.int64),
    "width": tfds.features.Scalar(np.int64),
    "mask": _BYTES(),
  }
  if loco:
    feats.update(
      {
        "channels": tfds.features.Sequence(_BYTES()),
        "channel_defects": tfds.features.Sequence(tfds.features.Text()),
        "channel_areas": tfds.features.Sequence(tfds.features.Scalar(np.int64)),
        # float: an absolute saturation threshold may be fractional (min(threshold, area))
        "channel_saturation_areas": tfds.features.Sequence(tfds.features.Scalar(np.float64)),
        "defects_config": tfds.features.Text(),
      }
    )
  return tfds.features.FeaturesDict(feats)


def _example(sample: records.Sample, specs: Sequence[records.DefectSpec], loco: bool) -> dict:
  data = pathlib.Path(sample.image).read_bytes()
  height, width = preprocess.decode_image(data, sample.image).shape[:2]  # validates the file
  ex = {
    "image": data,
    "id": sample.id,
    "label": sample.label,
    "defect": sample.defect,
    "loco_type": sample.loco_type,
    "height": height,
    "width": width,
    "mask": pathlib.Path(sample.mask).read_bytes() if sample.mask else b"",
  }
  if loco:
    pngs = [pathlib.Path(c).read_bytes() for c in sample.channels]
    info = [records.loco_channel(preprocess.decode_gray(png, c), specs, c) for png, c in zip(pngs, sample.channels)]
    ex.update(
      {
        "channels": pngs,
        "channel_defects": [i["defect"] for i in info],
        "channel_areas": [i["area"] for i in info],
        "channel_saturation_areas": [i["saturation_area"] for i in info],
        "defects_config": json.dumps([dataclasses.asdict(s) for s in specs]),
      }
    )
  return ex


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared logic: index the manual_dir with our indexers, yield one example per image."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release (efficientad_jax).",
    "1.1.0": "LOCO channel saturation areas as float (fractional absolute thresholds).",
  }
  LOCO = False
  # tfds' own `code_path` needs the `importlib_resources` backport, which tfds 4.9.10 does not
  # declare; the module file is what it would find.
  code_path = pathlib.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs wants metadata files beside the module.
    return tfds.core.DatasetInfo(
      builder=self, features=_features(self.LOCO), description=self.__doc__, supervised_keys=None
    )

  def _index(self, manual_dir: pathlib.Path) -> records.Splits:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    splits = self._index(pathlib.Path(dl_manager.manual_dir))
    names = ("train", "validation", "test") if self.LOCO else ("train", "test")
    return {n: self._generate_examples(splits[n], splits.defects_config) for n in names}

  def _generate_examples(self, samples, specs):
    for sample in samples:
      yield sample.id, _example(sample, specs, self.LOCO)


def _configs(names: Sequence[str]) -> list[tfds.core.BuilderConfig]:
  return [tfds.core.BuilderConfig(name=n, description=f"category {n}") for n in names]


class MvtecAd(_AnomalyBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019); manual download, one config per category."""

  BUILDER_CONFIGS = _configs(MVTEC_AD)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download mvtec_anomaly_detection.tar.xz from "
    "https://www.mvtec.com/company/research/datasets/mvtec-ad, "
    "extract it, and pass the folder holding bottle/, cable/, ..."
  )

  def _index(self, manual_dir):
    return indexes.index_mvtec_ad(manual_dir, self.builder_config.name, 0, 0.0)


class MvtecLoco(_AnomalyBuilder):
  """MVTec LOCO AD (Bergmann et al., IJCV 2022); manual download, one config per object."""

  LOCO = True
  BUILDER_CONFIGS = _configs(MVTEC_LOCO)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download mvtec_loco_anomaly_detection.tar.xz from "
    "https://www.mvtec.com/company/research/datasets/mvtec-loco, "
    "extract it, and pass the folder holding breakfast_box/, ..."
  )

  def _index(self, manual_dir):
    return indexes.index_mvtec_loco(manual_dir, self.builder_config.name)


class Visa(_AnomalyBuilder):
  """VisA (Zou et al., ECCV 2022), split_csv/1cls.csv; manual download, one config per object."""

  BUILDER_CONFIGS = _configs(VISA)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download VisA_20220922.tar from "
    "https://github.com/amazon-science/spot-diff, extract it, and "
    "pass the folder holding split_csv/ and candle/, ..."
  )

  def _index(self, manual_dir):
    return indexes.index_visa(manual_dir, self.builder_config.name, 0, 0.0)


BUILDERS = {"mvtec_ad": MvtecAd, "mvtec_loco": MvtecLoco, "visa": Visa}


class Subset(Sequence):
  """`source[positions[i]]`: a picklable view (grain workers) of a data source."""

  def __init__(self, source: Sequence[Any], positions: Sequence[int]):
    self.source, self.positions = source, list(positions)

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> Any:
    return self.source[self.positions[i]]


def load_splits(data_cfg, seed: int) -> dict[str, Sequence[Any]]:
  """Builds (first use, from data_cfg.root as manual_dir) and opens our TFDS dataset.

  Returns {'train', 'validation', 'test'} data sources of TFDS record dicts. MVTec AD / VisA:
  the seeded `validation_fraction` hold-out of 'train', by id, exactly as the folder index.
  """
  name, category = data_cfg.dataset, data_cfg.category
  if name not in BUILDERS:
    raise DataError(f"data.source='tfds' supports {sorted(BUILDERS)}, not {name!r}")
  builder_cls = BUILDERS[name]
  known = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if category not in known:
    raise DataError(f"category {category!r} is not a {name} config; available: {known}")
  if not data_cfg.root:
    raise DataError(
      f"dataset {name!r} via TFDS needs data.root (the extracted archive, the builder's manual_dir) for its first build"
    )
  sources = tfds.data_source(
    f"{name}/{category}",
    data_dir=data_cfg.tfds_data_dir or None,
    download=True,
    builder_kwargs={"file_format": "array_record"},  # tfds' default, TFRecord, needs TF
    download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(manual_dir=data_cfg.root)},
  )
  if builder_cls.LOCO:
    return {k: sources[k] for k in ("train", "validation", "test")}
  train = sources["train"]
  ids = [r["id"].decode() if isinstance(r["id"], bytes) else r["id"] for r in train]
  keep, held = records.hold_out_positions(ids, data_cfg.validation_fraction, seed)
  return {"train": Subset(train, keep), "validation": Subset(train, held), "test": sources["test"]}
