"""The side-by-side tool's data set (tools/side_by_side.py): the MVTec AD layout it builds from one photograph, and
how the other commands find its category. The photograph is a generated one here (scikit-image is not a test
dependency); the tool reads scikit-image's bundled files by name."""

import numpy as np
import pytest
from PIL import Image

from tools import side_by_side


def _photo(size: tuple[int, int]):
  rng = np.random.default_rng(0)
  return lambda name: Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_the_category_is_named_after_the_photograph_and_holds_every_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(side_by_side, "_skimage_photo", _photo((320, 430)))
  monkeypatch.setattr(side_by_side, "COUNTS", {"train": 3, "good": 2, "defect_per_type": 2})  # a small set, quick
  base = side_by_side.make_dataset(tmp_path, seed=1, photo_name="gravel.png")

  assert base == tmp_path / "mvtec" / "gravel"
  assert side_by_side.category(tmp_path) == "gravel"
  counts = side_by_side.COUNTS
  assert len(list((base / "train" / "good").glob("*.png"))) == counts["train"]
  assert len(list((base / "test" / "good").glob("*.png"))) == counts["good"]
  for kind in side_by_side.DEFECTS:
    images = sorted((base / "test" / kind).glob("*.png"))
    masks = sorted((base / "ground_truth" / kind).glob("*_mask.png"))
    assert len(images) == len(masks) == counts["defect_per_type"]
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (side_by_side.CROP, side_by_side.CROP) and mask.max() == 255
  assert Image.open(base / "train" / "good" / "000.png").size == (side_by_side.CROP, side_by_side.CROP)


def test_a_folder_with_two_categories_or_a_too_small_photograph_is_one_clear_error(tmp_path, monkeypatch):
  (tmp_path / "mvtec" / "a").mkdir(parents=True)
  (tmp_path / "mvtec" / "b").mkdir()
  with pytest.raises(SystemExit, match="holds 2 categories"):
    side_by_side.category(tmp_path)

  monkeypatch.setattr(side_by_side, "_skimage_photo", _photo((200, 200)))
  with pytest.raises(SystemExit, match="crops need"):
    side_by_side.make_dataset(tmp_path / "small", photo_name="tiny.png")
