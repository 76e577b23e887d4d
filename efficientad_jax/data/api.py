"""The one entry point of the trainer: `make_datasets(data_cfg, image_size, seed, training=True)` (docs/method.md
§4)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import grain

from efficientad_jax import config
from efficientad_jax.data import cache, indexes, pipeline, records, synthetic
from efficientad_jax.data.records import DataError, Splits

DATASETS = config.DATASETS  # defined with the config that names them


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run records about its data."""

  dataset: str  # one of config.DATASETS
  category: str  # the category / object ('widget' for the synthetic default)
  root: str  # the resolved dataset root
  loco: bool  # MVTec LOCO layout: logical and structural anomalies, AU-sPRO
  num_train: int
  num_validation: int
  num_test: int
  defects_config: list[dict]  # LOCO: each defect's saturation rule (`records.DefectSpec` as dicts)
  image_size: int | Sequence[int]
  penalty: str  # the penalty source ('' = off)
  decoded_once: bool  # every training image is already in the decode cache, so known to be readable


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What training and evaluation need.

  Attributes:
    train_iter: `train_iter(batch_size, process_index=0, process_count=1)` -> a fresh grain
      `DatasetIterator` over training batches (format: `pipeline.train_dataset`); its
      `get_state()` / `set_state()` resume the stream exactly.
    train_eval: the training images (the held-out validation ones excluded), un-jittered, as eval
      records: for the teacher channel statistics (docs/method.md §5.1).
    validation: normal images for map calibration (docs/method.md §7.2), eval records.
    test: test images, eval records (`pipeline.eval_element`).
    info: `DatasetInfo`, what the run and its model record about the data.
    listing: `listing()` -> {'train': [...], 'validation': [...]}, the images of both splits (file
      paths, or 'tfds:<id>' for TFDS records), for auditing a run's split (`split_names`).
  """

  train_iter: Callable[..., grain.DatasetIterator]
  train_eval: grain.MapDataset
  validation: grain.MapDataset
  test: grain.MapDataset
  info: DatasetInfo
  listing: Callable[[], dict[str, list[str]]]


def split_names(split: Sequence[Any]) -> list[str]:
  """The images of a split: `Sample` file paths, or 'tfds:<id>' of TFDS records (reading a TFDS
  record decodes it, hence a function the trainer calls once, not a field filled for every user)."""

  def name(record):
    if isinstance(record, records.Sample):
      return record.image
    rid = record["id"]
    return "tfds:" + (rid.decode() if isinstance(rid, bytes) else str(rid))

  return [name(r) for r in split]


def check_images(names: Sequence[str]) -> None:
  """Decodes every listed image file once (`split_names` output; TFDS records are skipped: their builder
  decoded them), so a corrupt or unsupported file raises its `DataError` before training, not after it."""
  from efficientad_jax.data import preprocess

  for name in names:
    if not name.startswith("tfds:"):
      try:
        preprocess.decode_image(name)
      except DataError as e:
        raise DataError(f"{e}: replace or remove the file, then run the same command again") from None


def build_index(data_cfg, seed: int) -> tuple[Splits, pathlib.Path | str]:
  """The file index named by `data_cfg` (generating the synthetic dataset if needed)."""
  name, root, category = data_cfg.dataset, data_cfg.root, data_cfg.category
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; known: {DATASETS}")
  if name == "synthetic":
    root = root or str(pathlib.Path(tempfile.gettempdir()) / "efficientad_synthetic")
    base = synthetic.generate_synthetic(
      root,
      layout=data_cfg.synthetic_layout,
      size=data_cfg.synthetic_size,
      num_train=data_cfg.synthetic_train,
      seed=data_cfg.synthetic_seed,
      category=category or "widget",
      num_validation=data_cfg.synthetic_validation,
      num_test=data_cfg.synthetic_test,
    )
    root, category = base.parent, base.name
    name = data_cfg.synthetic_layout
  if not root:
    raise DataError(f"dataset {name!r} needs data.root (the extracted archive)")
  if getattr(data_cfg, "download", False) and not pathlib.Path(root).is_dir():
    fetch_dataset(name, root)
  fraction = data_cfg.validation_fraction
  if name == "mvtec_ad":
    return indexes.index_mvtec_ad(root, category, seed, fraction), pathlib.Path(root) / category
  if name == "mvtec_loco":
    return indexes.index_mvtec_loco(root, category), pathlib.Path(root) / category
  if name == "visa":
    return indexes.index_visa(root, category, seed, fraction), pathlib.Path(root)
  return indexes.index_folder(root, category, seed, fraction), pathlib.Path(root) / category


def fetch_dataset(name: str, root: str | pathlib.Path) -> None:
  """data.download: the published archive of `name` extracted into `root`; failures become DataErrors."""
  from efficientad_jax.files import download

  if name not in download.DATASETS:
    raise DataError(
      f"data.download: dataset {name!r} has no published archive; "
      f"downloadable: {sorted(set(download.DATASETS) & set(DATASETS))}"
    )
  try:
    download.download_dataset(name, root)
  except download.DownloadError as e:
    raise DataError(f"data.download: {e}") from None


def _tfds_splits(data_cfg, seed: int) -> tuple[dict[str, Sequence[Any]], str]:
  from efficientad_jax.data import tfds_builders

  return tfds_builders.load_splits(data_cfg, seed), data_cfg.root


def make_datasets(
  data_cfg, image_size: int | Sequence[int], seed: int, *, training: bool = False, tiling: Any = None
) -> Datasets:
  """Index (or TFDS source), training stream and evaluation datasets for `data_cfg` (docs/method.md §4).

  Args:
    data_cfg: `config.DataConfig`.
    image_size: the size images are resized to, S or (H, W) (`config.ModelConfig.image_size`).
    seed: the run seed: the validation hold-out, shuffling, jitter and penalty draws.
    training: with `data_cfg.decode_cache`, decode every training image now, once, into the decode
      cache (`cache.decode_once`; a corrupt image fails here), which `train_iter` and `train_eval`
      then read. False (evaluation, prediction): no cache now; the first `train_iter` call builds it.
    tiling: `tiles.Tiling` (model.tile > 0): the training stream yields one random tile of each image (and
      penalty crops of the tile's size); evaluation records stay whole images, which inference tiles.
  """
  if data_cfg.source == "tfds" and data_cfg.dataset != "synthetic":
    splits, root = _tfds_splits(data_cfg, seed)
    specs = ()  # TFDS LOCO records carry their object's defects_config (for `info` only here)
    if data_cfg.dataset == "mvtec_loco" and len(splits["test"]):
      text = splits["test"][0]["defects_config"]
      text = text.decode() if isinstance(text, bytes) else text
      specs = tuple(records.parse_defect(e, "TFDS defects_config") for e in json.loads(text))
  elif data_cfg.source in ("files", "tfds"):
    index, root = build_index(data_cfg, seed)
    splits = {"train": index.train, "validation": index.validation, "test": index.test}
    specs = index.defects_config
  else:
    raise DataError(f"data.source must be 'files' or 'tfds', got {data_cfg.source!r}")
  for split in ("train", "test"):
    if not len(splits[split]):
      raise DataError(f"{root}: empty split ({split})")
  penalty = indexes.penalty_source(data_cfg.penalty, data_cfg.tfds_data_dir)
  # One cache per Datasets, shared by every train_iter and by train_eval; its file goes with them.
  decoded = [cache.decode_once(splits["train"], image_size) if training and data_cfg.decode_cache else None]

  def train_iter(batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    if data_cfg.decode_cache and decoded[0] is None:
      decoded[0] = cache.decode_once(splits["train"], image_size)
    ds = pipeline.train_dataset(
      splits["train"],
      penalty,
      image_size=image_size,
      batch_size=batch_size,
      seed=seed,
      data_cfg=data_cfg,
      process_index=process_index,
      process_count=process_count,
      cache=decoded[0],
      tiling=tiling,
    )
    return iter(ds)

  make_eval = lambda s: pipeline.eval_dataset(s, image_size=image_size, data_cfg=data_cfg, specs=specs)
  train_eval = (
    make_eval(splits["train"])
    if decoded[0] is None
    else pipeline.cached_eval_dataset(splits["train"], decoded[0], data_cfg=data_cfg, specs=specs)
  )
  loco = data_cfg.dataset == "mvtec_loco" or (
    data_cfg.dataset == "synthetic" and data_cfg.synthetic_layout == "mvtec_loco"
  )
  category = data_cfg.category or ("widget" if data_cfg.dataset == "synthetic" else "")
  info = DatasetInfo(
    dataset=data_cfg.dataset,
    category=category,
    root=str(root),
    loco=loco,
    num_train=len(splits["train"]),
    num_validation=len(splits["validation"]),
    num_test=len(splits["test"]),
    defects_config=[dataclasses.asdict(s) for s in specs],
    image_size=image_size,
    penalty=data_cfg.penalty,
    decoded_once=decoded[0] is not None,
  )
  return Datasets(
    train_iter=train_iter,
    train_eval=train_eval,
    validation=make_eval(splits["validation"]),
    test=make_eval(splits["test"]),
    info=info,
    listing=lambda: {k: split_names(splits[k]) for k in ("train", "validation")},
  )


def describe(splits: Splits) -> dict:
  """Counts per split and defect (a quick look at an index)."""
  out = {}
  for split in records.SPLITS:
    counts: dict[str, int] = {}
    for s in splits[split]:
      counts[s.defect] = counts.get(s.defect, 0) + 1
    out[split] = counts
  return out
