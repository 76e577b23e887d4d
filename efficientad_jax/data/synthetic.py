"""A built-in synthetic dataset: a manufactured "part" in MVTec AD or MVTec LOCO layout (docs/method.md §4.3).

The part: on a striped textured background, a green board carrying two red discs (top), a blue
square (bottom left) and a yellow bar (bottom right); every image jitters the parts' positions, the
global offset, the brightness and the sensor noise a little. Anomalies are large and high-contrast
so that a small model trained a few hundred steps at 64x64 can find them:

  structural: scratch (a pale line), stain (a dark brown blob), missing_material (a black bite out
              of a part); MVTec AD layout: one test folder each, masks <id>_mask.png (0/255).
  logical (LOCO layout only): missing_item (a red disc absent), extra_item (a third red disc),
              wrong_position (the blue square moved), wrong_colour (a red disc painted yellow);
              one ground-truth PNG per defect holding its defects_config.json pixel_value.

Every image draws from its own generator seeded by (seed, split, defect, index): deterministic for
a seed and independent of the other counts. Drawing is numpy + PIL only; 100 images at 64x64 take
well under a second.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import zlib

import numpy as np
from PIL import Image, ImageDraw

STRUCTURAL = ("scratch", "stain", "missing_material")
LOGICAL = ("missing_item", "extra_item", "wrong_position", "wrong_colour")
RED, BLUE, YELLOW, BOARD = (200, 40, 40), (40, 70, 200), (230, 200, 40), (40, 110, 60)

# defects_config.json of the LOCO layout: pixel values, saturation as in the official format. The
# absolute scratch threshold is scaled with the image area in `_defects_config`.
_CONFIG = (
  ("missing_item", 255, 1.0, True),
  ("extra_item", 254, 1.0, True),
  ("wrong_position", 253, 1.0, True),
  ("wrong_colour", 252, 1.0, True),
  ("scratch", 251, None, False),
  ("stain", 250, 0.5, True),
  ("missing_material", 249, 0.75, True),
)


def _defects_config(size: int) -> list[dict]:
  return [
    {
      "defect_name": name,
      "pixel_value": value,
      "saturation_threshold": threshold if threshold else max(1, round(0.01 * size * size)),
      "relative_saturation": relative,
    }
    for name, value, threshold, relative in _CONFIG
  ]


def _rng(seed: int, *keys: object) -> np.random.Generator:
  # crc32 of the key names: a stable integer (Python's hash() of a str changes between runs).
  return np.random.default_rng([seed] + [zlib.crc32(str(k).encode()) for k in keys])


def _layout(size: int, rng: np.random.Generator) -> dict:
  """Nominal part geometry (pixel centres and sizes) with small random jitter."""
  j = lambda: rng.uniform(-0.02, 0.02, 2) * size
  shift = rng.uniform(-0.02, 0.02, 2) * size
  at = lambda x, y: np.array([x, y]) * size + shift + j()
  return {
    "discs": [at(0.3, 0.3), at(0.7, 0.3)],
    "square": at(0.3, 0.7),
    "bar": at(0.7, 0.7),
    "r": 0.1 * size,
    "half": 0.1 * size,
    "bar_half": (0.14 * size, 0.05 * size),
    "shift": shift,
  }


def _background(size: int, rng: np.random.Generator, shift: np.ndarray) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  stripes = np.sin(2 * np.pi * (3 * x + 2 * y) / size + rng.uniform(-0.2, 0.2))
  base = np.array([150.0, 140.0, 120.0], np.float32) + 12.0 * stripes[..., None]
  image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  lo, hi = (np.array([0.1, 0.1]) * size + shift), (np.array([0.9, 0.9]) * size + shift)
  ImageDraw.Draw(image).rectangle([*lo, *hi], fill=BOARD)
  return np.asarray(image).copy()


def _disc(draw: ImageDraw.ImageDraw, c: np.ndarray, r: float, fill) -> None:
  draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill)


def _square(draw: ImageDraw.ImageDraw, c: np.ndarray, h: float, fill) -> None:
  draw.rectangle([c[0] - h, c[1] - h, c[0] + h, c[1] + h], fill=fill)


def _bar(draw: ImageDraw.ImageDraw, c: np.ndarray, h: tuple[float, float], fill) -> None:
  draw.rectangle([c[0] - h[0], c[1] - h[1], c[0] + h[0], c[1] + h[1]], fill=fill)


def _draw_parts(image: Image.Image, g: dict, colours: list, skip_disc: int = -1) -> None:
  draw = ImageDraw.Draw(image)
  for i, c in enumerate(g["discs"]):
    if i != skip_disc:
      _disc(draw, c, g["r"], colours[i])
  _square(draw, g["square"], g["half"], BLUE)
  _bar(draw, g["bar"], g["bar_half"], YELLOW)


def _mask(size: int, paint) -> np.ndarray:
  m = Image.new("L", (size, size), 0)
  paint(ImageDraw.Draw(m))
  return np.asarray(m) > 0


def _logical(defect: str, size: int, g: dict, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
  """Draws normal-looking parts in a wrong count, position or colour; returns (image, mask)."""
  image = Image.fromarray(_background(size, rng, g["shift"]))
  colours, skip = [RED, RED], -1
  paint = None
  k = int(rng.integers(2))
  if defect == "missing_item":
    skip = k
    paint = lambda d: _disc(d, g["discs"][k], g["r"], 1)
  elif defect == "wrong_colour":
    colours[k] = YELLOW
    paint = lambda d: _disc(d, g["discs"][k], g["r"], 1)
  elif defect == "wrong_position":
    old, g = g["square"], dict(g, square=np.array([0.5, 0.52]) * size + g["shift"])
    paint = lambda d: (_square(d, old, g["half"], 1), _square(d, g["square"], g["half"], 1))
  _draw_parts(image, g, colours, skip)
  if defect == "extra_item":
    centre = np.array([0.5, 0.52]) * size + g["shift"]
    _disc(ImageDraw.Draw(image), centre, g["r"], RED)
    paint = lambda d: _disc(d, centre, g["r"], 1)
  return image, _mask(size, paint)


def _structural(defect: str, size: int, image: Image.Image, g: dict, rng: np.random.Generator) -> np.ndarray:
  """Damages `image` in place; returns the [size, size] bool mask of the damage."""
  draw = ImageDraw.Draw(image)
  if defect == "scratch":
    width = max(2, size // 20)
    centre, angle = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0, np.pi)
    half = 0.25 * size * np.array([np.cos(angle), np.sin(angle)])  # half of a 0.5 * size line
    a, b = centre - half, centre + half
    paint = lambda d, fill: d.line([*a, *b], fill=fill, width=width)
    paint(draw, (235, 235, 235))
  elif defect == "stain":
    c, (rx, ry) = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.07, 0.11, 2) * size
    paint = lambda d, fill: d.ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=fill)
    paint(draw, (90, 50, 20))
  elif defect == "missing_material":
    part = [g["discs"][0], g["discs"][1], g["square"], g["bar"]][int(rng.integers(4))]
    c = part + rng.uniform(-0.06, 0.06, 2) * size
    h = 0.07 * size
    paint = lambda d, fill: d.rectangle([c[0] - h, c[1] - h, c[0] + h, c[1] + h], fill=fill)
    paint(draw, (15, 15, 15))
  else:
    raise ValueError(f"unknown structural defect {defect!r}; known: {STRUCTURAL}")
  return _mask(size, lambda d: paint(d, 1))


def render(size: int, seed: int, split: str, defect: str, index: int) -> tuple[np.ndarray, np.ndarray]:
  """One image of the part: ([size, size, 3] uint8, [size, size] bool mask; all False if normal)."""
  rng = _rng(seed, split, defect, index)
  g = _layout(size, rng)
  if defect in LOGICAL:
    image, mask = _logical(defect, size, g, rng)
  else:
    image = Image.fromarray(_background(size, rng, g["shift"]))
    _draw_parts(image, g, [RED, RED])
    mask = np.zeros((size, size), bool)
    if defect != "good":
      mask = _structural(defect, size, image, g, rng)
  pixels = np.asarray(image).astype(np.float32) * rng.uniform(0.96, 1.04)
  pixels += rng.normal(0.0, 3.0, pixels.shape)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8), mask


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _write_tree(base: pathlib.Path, layout: str, size: int, seed: int, counts: dict) -> None:
  for split, n in (("train", counts["train"]), ("validation", counts["validation"])):
    for i in range(n):
      _save(base / split / "good" / f"{i:03d}.png", render(size, seed, split, "good", i)[0])
  for i in range(counts["test"]):
    _save(base / "test" / "good" / f"{i:03d}.png", render(size, seed, "test", "good", i)[0])
  if layout == "mvtec_ad":
    for defect in STRUCTURAL:
      for i in range(counts["test"]):
        image, mask = render(size, seed, "test", defect, i)
        _save(base / "test" / defect / f"{i:03d}.png", image)
        _save(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return
  config = _defects_config(size)
  values = {c["defect_name"]: c["pixel_value"] for c in config}
  (base / "defects_config.json").write_text(json.dumps(config, indent=4))
  for loco_type, defects in (("logical_anomalies", LOGICAL), ("structural_anomalies", STRUCTURAL)):
    for i in range(counts["test"] * len(defects)):
      defect = defects[i % len(defects)]  # the defects take turns within the type's folder
      image, mask = render(size, seed, "test", defect, i)
      _save(base / "test" / loco_type / f"{i:03d}.png", image)
      _save(base / "ground_truth" / loco_type / f"{i:03d}" / "000.png", mask.astype(np.uint8) * values[defect])


def _made_with(stamp: pathlib.Path, params: dict) -> bool:
  try:
    return json.loads(stamp.read_text()) == params
  except (OSError, ValueError):
    return False


def generate_synthetic(
  root: str | pathlib.Path,
  layout: str = "mvtec_ad",
  size: int = 64,
  num_train: int = 40,
  seed: int = 0,
  category: str = "widget",
  num_validation: int = 8,
  num_test: int = 8,
) -> pathlib.Path:
  """Writes the synthetic dataset to `root/category` (cached) and returns that folder.

  Args:
    root: parent folder; the dataset is `root/category`, indexable with `index_mvtec_ad` /
      `index_mvtec_loco` exactly like the real datasets.
    layout: "mvtec_ad" (train, test/{good,<structural>}, ground_truth) or "mvtec_loco" (adds
      validation/good, logical anomalies, per-defect channel PNGs and defects_config.json).
    size: image side in pixels.
    num_train: normal training images (MVTec AD layout: the validation hold-out comes from these).
    num_validation: LOCO layout only: images in validation/good.
    num_test: good test images, and test images per defect type.

  The tree is built in a temporary folder and renamed into place, so an interrupted run leaves
  nothing half-written; a tree made with the same arguments (synthetic.json) is reused.
  """
  if layout not in ("mvtec_ad", "mvtec_loco"):
    raise ValueError(f"synthetic layout must be 'mvtec_ad' or 'mvtec_loco', got {layout!r}")
  if size < 16 or min(num_train, num_test) < 1:
    raise ValueError(
      f"synthetic dataset needs size >= 16 and at least one image per split, got "
      f"size={size}, num_train={num_train}, num_test={num_test}"
    )
  counts = {"train": num_train, "validation": num_validation if layout == "mvtec_loco" else 0, "test": num_test}
  params = {"layout": layout, "size": size, "seed": seed, "counts": counts, "version": 1}
  root = pathlib.Path(root)
  target = root / category
  stamp = target / "synthetic.json"
  if _made_with(stamp, params):
    return target
  if target.exists() and not stamp.is_file():
    raise FileExistsError(f"{target} exists and is not a synthetic dataset; choose another root")
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{category}-", dir=root))
  try:
    _write_tree(tmp, layout, size, seed, counts)
    (tmp / "synthetic.json").write_text(json.dumps(params))
    # Several processes of one run may generate the same tree at once: the first rename wins and the
    # others use its tree; only a tree made with OTHER arguments is replaced.
    if _made_with(stamp, params):
      return target
    if target.exists():
      shutil.rmtree(target)  # ours (it has synthetic.json), made with other arguments
    try:
      tmp.rename(target)
    except OSError:
      if not _made_with(stamp, params):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
