"""Dataset indexes: MVTec AD, MVTec LOCO AD, VisA and a plain folder (docs/method.md §4.3).

Each `index_*` function lists files only (plus image/mask header reads to catch size mismatches
early, before a long training run) and returns `records.Splits`. Layouts:

  MVTec AD   <root>/<cat>/{train/good, test/<defect>, ground_truth/<defect>/<id>_mask.png}
  LOCO       <root>/<obj>/{train/good, validation/good,
                           test/{good,logical_anomalies,structural_anomalies},
                           ground_truth/<type>/<id>/NNN.png, defects_config.json}
  VisA       <root>/split_csv/1cls.csv (object, split, label, image, mask) over <obj>/Data/...
  folder     <root>/train/good [+ test/<defect>/ + ground_truth/<defect>/<id>_mask.png]

Validation: LOCO has its own validation/good; the others hold out a seeded fraction of train.
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence
from typing import Any

from PIL import Image

from efficientad_jax.data import records
from efficientad_jax.data.records import DataError, Sample, Splits

PENALTY_SUFFIXES = (".jpg", ".jpeg", ".png")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files directly in `folder`, sorted by name (hidden files skipped)."""
  return sorted(
    p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
  )


def _subdirs(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def category_dir(root: str | pathlib.Path, category: str, marker: str = "train") -> pathlib.Path:
  """`root/category`, or a DataError listing the available categories (folders holding `marker`)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(
      f"dataset root {root} does not exist or is not a folder (data.root): pass "
      "--set data.root=<the extracted dataset>, or fetch it with `python -m experiments.download` "
      "(or --set data.download=true)"
    )
  path = root / category
  if not category or not (path / marker).is_dir():
    available = [d for d in _subdirs(root) if (root / d / marker).is_dir()]
    raise DataError(
      f"category {category!r} not found in {root} (no {path / marker}; data.category); "
      f"available: {available}: pass one with --set data.category=NAME"
    )
  return path


def _images_or_error(folder: pathlib.Path, what: str) -> list[pathlib.Path]:
  if not folder.is_dir():
    parent = folder.parent
    listing = _subdirs(parent) if parent.is_dir() else []
    raise DataError(f"{folder}: missing ({what}); {parent} holds folders {listing}")
  images = list_images(folder)
  if not images:
    raise DataError(f"{folder}: empty split ({what}): no {'/'.join(IMAGE_SUFFIXES)} images")
  return images


def _check_same_size(image: pathlib.Path, mask: pathlib.Path) -> None:
  sizes = []
  for path in (image, mask):
    try:
      with Image.open(path) as im:
        sizes.append(im.size)
    except (OSError, SyntaxError, ValueError) as e:
      raise DataError(f"{path}: cannot be read as an image ({e})") from None
  if sizes[0] != sizes[1]:
    raise DataError(f"{mask}: mask size {sizes[1]} (W, H) differs from its image {image} size {sizes[0]}")


def _normal_samples(images: Sequence[pathlib.Path], prefix: str) -> list[Sample]:
  return [Sample(image=str(p), id=f"{prefix}/{p.stem}", label=0, defect="good") for p in images]


def _masked_test(base: pathlib.Path, test: pathlib.Path, required: bool) -> list[Sample]:
  """test/<defect>/*.png with ground_truth/<defect>/<stem>_mask.png (MVTec AD and folder layout)."""
  if not test.is_dir():
    if required:
      raise DataError(f"{test}: missing; {base} holds folders {_subdirs(base)}")
    return []
  samples = []
  gt_root = base / "ground_truth"
  for defect in _subdirs(test):
    images = _images_or_error(test / defect, f"test images of defect {defect!r}")
    if defect == "good":
      samples += _normal_samples(images, "test/good")
      continue
    for image in images:
      mask = gt_root / defect / f"{image.stem}_mask.png"
      if not mask.is_file():
        raise DataError(f"{image}: its ground-truth mask {mask} is missing")
      _check_same_size(image, mask)
      samples.append(Sample(image=str(image), id=f"test/{defect}/{image.stem}", label=1, defect=defect, mask=str(mask)))
  if required and not samples:
    raise DataError(f"{test}: empty split (test): no defect folders with images")
  _check_orphan_masks(gt_root, samples)
  return samples


def _check_orphan_masks(gt_root: pathlib.Path, samples: Sequence[Sample]) -> None:
  if not gt_root.is_dir():
    return
  used = {s.mask for s in samples if s.mask}
  for defect in _subdirs(gt_root):
    for mask in list_images(gt_root / defect):
      if str(mask) not in used:
        raise DataError(
          f"{mask}: ground-truth mask without a test image (expected test/{defect}/{mask.stem.removesuffix('_mask')}.*)"
        )


def index_mvtec_ad(root: str | pathlib.Path, category: str, seed: int, validation_fraction: float = 0.1) -> Splits:
  """MVTec AD category: train/good minus a seeded hold-out, the hold-out, test with masks."""
  base = category_dir(root, category)
  train_all = _normal_samples(_images_or_error(base / "train" / "good", "train"), "train/good")
  train, validation = records.hold_out(train_all, validation_fraction, seed)
  test = _masked_test(base, base / "test", required=True)
  return Splits(train, validation, tuple(test))


def index_folder(root: str | pathlib.Path, category: str, seed: int, validation_fraction: float = 0.1) -> Splits:
  """Plain folder `<root>[/<category>]/train/good`, optional test/ and ground_truth/ as MVTec AD."""
  base = category_dir(root, category) if category else pathlib.Path(root)
  if not base.is_dir():
    raise DataError(f"dataset root {base} does not exist or is not a folder")
  train_all = _normal_samples(_images_or_error(base / "train" / "good", "train"), "train/good")
  train, validation = records.hold_out(train_all, validation_fraction, seed)
  test = _masked_test(base, base / "test", required=False)
  return Splits(train, validation, tuple(test))


def index_mvtec_loco(root: str | pathlib.Path, category: str) -> Splits:
  """MVTec LOCO object: train/good, its own validation/good, test with per-defect channel PNGs."""
  base = category_dir(root, category)
  specs = records.parse_defects_config(base / "defects_config.json")
  train = _normal_samples(_images_or_error(base / "train" / "good", "train"), "train/good")
  validation = _normal_samples(_images_or_error(base / "validation" / "good", "validation"), "validation/good")
  test_dir = base / "test"
  if not test_dir.is_dir():
    raise DataError(f"{test_dir}: missing; {base} holds folders {_subdirs(base)}")
  unknown = sorted(set(_subdirs(test_dir)) - set(records.LOCO_TYPES))
  if unknown:
    raise DataError(f"{test_dir}: unknown folders {unknown}; MVTec LOCO test folders are {records.LOCO_TYPES}")
  test = []
  for loco_type in records.LOCO_TYPES:
    folder = test_dir / loco_type
    if not folder.is_dir():
      continue
    for image in _images_or_error(folder, f"test images of {loco_type}"):
      channels = ()
      if loco_type != "good":
        channels = _loco_channels(base, loco_type, image)
      test.append(
        Sample(
          image=str(image),
          id=f"test/{loco_type}/{image.stem}",
          label=int(loco_type != "good"),
          defect=loco_type,
          loco_type=loco_type,
          channels=channels,
        )
      )
  if not test:
    raise DataError(f"{test_dir}: empty split (test): none of {records.LOCO_TYPES} holds images")
  _check_orphan_channels(base, test)
  return Splits(tuple(train), tuple(validation), tuple(test), defects_config=specs)


def _loco_channels(base: pathlib.Path, loco_type: str, image: pathlib.Path) -> tuple[str, ...]:
  gt = base / "ground_truth" / loco_type / image.stem
  if not gt.is_dir():
    raise DataError(f"{image}: its ground-truth folder {gt} is missing")
  pngs = [p for p in list_images(gt)]
  if not pngs:
    raise DataError(f"{gt}: no ground-truth PNGs for {image}")
  for png in pngs:
    _check_same_size(image, png)
  return tuple(str(p) for p in pngs)


def _check_orphan_channels(base: pathlib.Path, test: Sequence[Sample]) -> None:
  ids = {(s.loco_type, pathlib.Path(s.image).stem) for s in test}
  for loco_type in ("logical_anomalies", "structural_anomalies"):
    folder = base / "ground_truth" / loco_type
    if not folder.is_dir():
      continue
    for stem in _subdirs(folder):
      if (loco_type, stem) not in ids:
        raise DataError(
          f"{folder / stem}: ground truth without a test image (expected {base / 'test' / loco_type / stem}.png)"
        )


VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def index_visa(root: str | pathlib.Path, category: str, seed: int, validation_fraction: float = 0.1) -> Splits:
  """VisA object from `split_csv/1cls.csv`; train normals minus a seeded hold-out; test with masks."""
  root = pathlib.Path(root)
  table = root / "split_csv" / "1cls.csv"
  if not table.is_file():
    raise DataError(f"{table}: missing (VisA needs split_csv/1cls.csv under the dataset root)")
  with open(table, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(VISA_COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise DataError(f"{table}: missing columns {sorted(missing)}; expected {VISA_COLUMNS}")
    rows = list(reader)
  objects = sorted({r["object"] for r in rows})
  if category not in objects:
    raise DataError(f"category {category!r} not in {table}; available: {objects}")
  train_all, test = [], []
  for line, row in enumerate(rows, start=2):
    if row["object"] == category:
      sample = _visa_sample(root, row, f"{table}:{line}")
      (train_all if row["split"] == "train" else test).append(sample)
  if not train_all:
    raise DataError(f"{table}: empty split (train) for {category!r}")
  if not test:
    raise DataError(f"{table}: empty split (test) for {category!r}")
  train, validation = records.hold_out(train_all, validation_fraction, seed)
  return Splits(train, validation, tuple(sorted(test, key=lambda s: s.id)))


def _visa_sample(root: pathlib.Path, row: dict, where: str) -> Sample:
  split, label = row["split"].strip(), row["label"].strip()
  if split not in ("train", "test") or label not in ("normal", "anomaly"):
    raise DataError(f"{where}: split must be train|test and label normal|anomaly, got {split!r}, {label!r}")
  image = root / row["image"].strip()
  if not image.is_file():
    raise DataError(f"{where}: image {image} does not exist")
  if split == "train" and label != "normal":
    raise DataError(f"{where}: anomalous image {image} in the train split")
  defect = "good" if label == "normal" else "anomaly"
  mask = None
  if label == "anomaly":
    mask_path = root / (row["mask"] or "").strip()
    if not (row["mask"] or "").strip() or not mask_path.is_file():
      raise DataError(f"{where}: anomalous image {image} has no mask file ({mask_path})")
    _check_same_size(image, mask_path)
    mask = str(mask_path)
  return Sample(
    image=str(image), id=f"{split}/{defect}/{image.stem}", label=int(label == "anomaly"), defect=defect, mask=mask
  )


def penalty_source(spec: str, tfds_data_dir: str = "") -> Sequence[Any] | None:
  """ "" -> None; "tfds:<name>" -> tfds.data_source(<name>, split='train'); else an image folder.

  A folder is searched recursively for .jpg/.jpeg/.png files (sorted paths).
  """
  if not spec:
    return None
  if spec.startswith("tfds:"):
    import tensorflow_datasets as tfds

    return tfds.data_source(spec[len("tfds:") :], split="train", data_dir=tfds_data_dir or None, download=False)
  folder = pathlib.Path(spec)
  if not folder.is_dir():
    raise DataError(
      f"penalty folder {folder} does not exist (data.penalty): pass --set data.penalty=<an "
      "ImageNet-like image folder>, tfds:imagenette, or nothing (training without the penalty)"
    )
  paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PENALTY_SUFFIXES)
  if not paths:
    raise DataError(f"penalty folder {folder}: no {'/'.join(PENALTY_SUFFIXES)} images")
  return paths
