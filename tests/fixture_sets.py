"""What a fixture set says about itself: category names, image sizes and files, read from its JSON and trees.

Tests take every name, size and count from here, never from literals of one set, so they hold for any fixture
set in the format of tests/fixtures/README.md (`tools/make_fixture_variant.py` makes one with other names).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib


@dataclasses.dataclass(frozen=True)
class DatasetFixture:
  """One synthetic dataset of the fixtures (mvtec_ad/ or mvtec_loco/)."""

  doc: dict  # its expected.json
  root: pathlib.Path  # the dataset folder, holding the category folder
  category: str  # expected.json "object"
  size_hw: tuple[int, int]  # every image and map of the set is this size

  @property
  def category_dir(self) -> pathlib.Path:
    return self.root / self.category


def _dataset(fixtures: pathlib.Path, part: str) -> DatasetFixture:
  doc = json.loads((fixtures / part / "expected.json").read_text())
  return DatasetFixture(
    doc=doc, root=fixtures / part / doc["dataset_dir"], category=doc["object"], size_hw=tuple(doc["image_size_hw"])
  )


def dataset_root(fixtures: pathlib.Path, part: str) -> pathlib.Path:
  """The dataset folder of part "mvtec_ad" or "mvtec_loco" (expected.json "dataset_dir")."""
  return _dataset(fixtures, part).root


def mvtec_ad(fixtures: pathlib.Path) -> DatasetFixture:
  return _dataset(fixtures, "mvtec_ad")


def mvtec_loco(fixtures: pathlib.Path) -> DatasetFixture:
  return _dataset(fixtures, "mvtec_loco")


def pngs(folder: pathlib.Path) -> list[pathlib.Path]:
  """The PNG files of a folder, sorted by name."""
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".png")


def subfolders(folder: pathlib.Path) -> list[str]:
  """Names of the folders inside `folder`, sorted."""
  return sorted(p.name for p in folder.iterdir() if p.is_dir())


def defect_folders(category_dir: pathlib.Path) -> list[str]:
  """The anomalous test folders of an MVTec AD category (test/* except good), sorted."""
  return [name for name in subfolders(category_dir / "test") if name != "good"]


def unused_name(taken, stem: str = "unseen") -> str:
  """A folder name that is not among `taken` (for a new, empty defect folder and the like)."""
  name = stem
  while name in set(taken):
    name += "_x"
  return name
