"""Sample records, splits, the LOCO defects configuration and the seeded validation hold-out (docs/method.md §4.2).

A dataset index is plain data: tuples of `Sample`, one per image, sorted by id, so an index is the
same on every machine and every run. Nothing here opens an image except `loco_channel`, which reads
one ground-truth PNG to find its defect and saturation area.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from efficientad_jax.metrics.spro import saturation_area

LOCO_TYPES = ("good", "logical_anomalies", "structural_anomalies")
SPLITS = ("train", "validation", "test")


class DataError(ValueError):
  """A dataset file or folder is missing, malformed or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of an index.

  Attributes:
    image: path of the image file.
    id: stable id, unique within the index, e.g. "test/crack/000" or "validation/good/003".
    label: 0 normal, 1 anomalous.
    defect: defect type: "good", the MVTec AD defect folder ("crack"), the LOCO type
      ("logical_anomalies"), VisA "anomaly".
    loco_type: MVTec LOCO only: "good" | "logical_anomalies" | "structural_anomalies"; "" otherwise.
    mask: ground-truth mask path (nonzero = anomalous); None for normal images and for LOCO.
    channels: MVTec LOCO only: one ground-truth PNG per defect ("channel"), sorted by name.
  """

  image: str
  id: str
  label: int
  defect: str
  loco_type: str = ""
  mask: str | None = None
  channels: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Splits:
  """An index: train (normal, used for training), validation (normal, calibration), test."""

  train: tuple[Sample, ...]
  validation: tuple[Sample, ...]
  test: tuple[Sample, ...]
  defects_config: tuple[DefectSpec, ...] = ()  # MVTec LOCO only

  def __getitem__(self, split: str) -> tuple[Sample, ...]:
    if split not in SPLITS:
      raise KeyError(f"unknown split {split!r}; splits: {SPLITS}")
    return getattr(self, split)


@dataclasses.dataclass(frozen=True)
class DefectSpec:
  """One entry of MVTec LOCO's defects_config.json."""

  defect_name: str
  pixel_value: int
  saturation_threshold: float
  relative_saturation: bool


def parse_defects_config(path: str | pathlib.Path) -> tuple[DefectSpec, ...]:
  """Reads and validates a LOCO defects_config.json (a list of objects, unique pixel values)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: missing (MVTec LOCO objects need their defects_config.json)")
  try:
    entries = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(entries, list) or not entries:
    raise DataError(f"{path}: expected a non-empty JSON list of defect objects")
  specs = []
  for i, entry in enumerate(entries):
    specs.append(parse_defect(entry, f"{path}: entry {i}"))
  values = [s.pixel_value for s in specs]
  if len(set(values)) != len(values):
    raise DataError(f"{path}: pixel_value must be unique per defect, got {values}")
  return tuple(specs)


def parse_defect(entry: object, where: str) -> DefectSpec:
  keys = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")
  if not isinstance(entry, dict) or set(keys) - set(entry):
    raise DataError(f"{where}: expected an object with keys {keys}, got {entry!r}")
  name, value = entry["defect_name"], entry["pixel_value"]
  threshold, relative = entry["saturation_threshold"], entry["relative_saturation"]
  if not isinstance(name, str) or not name:
    raise DataError(f"{where}: defect_name must be a non-empty string, got {name!r}")
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
    raise DataError(f"{where} ({name}): pixel_value must be an integer in 1..255, got {value!r}")
  if not isinstance(relative, bool):
    raise DataError(f"{where} ({name}): relative_saturation must be true/false, got {relative!r}")
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
    raise DataError(f"{where} ({name}): saturation_threshold must be a positive number, got {threshold!r}")
  if relative and threshold > 1:
    raise DataError(f"{where} ({name}): a relative saturation_threshold must be in (0, 1], got {threshold!r}")
  return DefectSpec(name, value, float(threshold), relative)


def loco_channel(mask: np.ndarray, specs: Sequence[DefectSpec], path: str) -> dict:
  """Describes one LOCO ground-truth channel: {'mask','defect','pixel_value','area','saturation_area'}.

  Args:
    mask: [H, W] uint8 PNG content: 0 and exactly one defect's pixel_value.
    specs: the object's defects configuration.
    path: the PNG's path, for error messages.
  """
  values = np.unique(mask)
  values = values[values != 0]
  by_value = {s.pixel_value: s for s in specs}
  unknown = [int(v) for v in values if int(v) not in by_value]
  if unknown:
    raise DataError(f"{path}: pixel values {unknown} are not in defects_config.json (known: {sorted(by_value)})")
  if len(values) != 1:
    raise DataError(
      f"{path}: a LOCO channel must hold exactly one defect value besides 0, got {[int(v) for v in values]}"
    )
  spec = by_value[int(values[0])]
  binary = mask != 0
  area = int(binary.sum())
  return {
    "mask": binary,
    "defect": spec.defect_name,
    "pixel_value": spec.pixel_value,
    "area": area,
    "saturation_area": saturation_area(area, spec.saturation_threshold, spec.relative_saturation),
  }


def hold_out_count(n: int, fraction: float) -> int:
  """How many of n training images are held out: n - int((1 - fraction) * n), at most n - 1.

  The reference keeps int(0.9 n) for training (docs/method.md §4.2). Computed with the
  reference's own expression: 1.0 - 0.1 == 0.9 in binary, so fraction 0.1 gives exactly n - int(0.9 n)
  (tested for n <= 10000); round(0.1 n) would differ, e.g. for n = 1..5, 11..14, 21. One image is always
  left for training (for n = 1 the reference would train on none).
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
  return min(n - int((1.0 - fraction) * n), max(n - 1, 0))


def hold_out_positions(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
  """Positions (into `ids`) of the training and the held-out validation images.

  `hold_out_count(n, fraction)` images are held out, chosen by a seeded permutation. Deterministic
  for (set of ids, fraction, seed), independent of listing order.
  """
  order = sorted(range(len(ids)), key=lambda i: ids[i])
  n = len(order)
  n_val = hold_out_count(n, fraction)
  held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
  train = [order[k] for k in range(n) if k not in held]
  validation = [order[k] for k in range(n) if k in held]
  return train, validation


def hold_out(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
  """Splits normal training samples into (train, validation) by `hold_out_positions`."""
  train, validation = hold_out_positions([s.id for s in samples], fraction, seed)
  return tuple(samples[i] for i in train), tuple(samples[i] for i in validation)
