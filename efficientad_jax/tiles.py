"""Tiles for images larger than the networks' input (`--set model.tile=T`; docs/method.md §7.5): where they
lie and how their maps are blended back into one (NumPy only; the cutting and stitching of arrays is done by
`efficientad.inference` in JAX and by the data pipeline in NumPy, both from this geometry).

Each image is first resized to `model.image_size` (H x W, possibly its full resolution), then covered by T x T
tiles: along each side they start every T - overlap pixels, and the last one is moved flush with the far edge
(so it may overlap its neighbour by more). Training draws one of an image's tiles at random; inference runs all
of them as one batch and stitches their maps back with `window` weights: 1 in a tile's inner part, falling
linearly to 1 / (overlap + 1) over its outer `overlap` pixels, so where tiles overlap the map fades from one
to the other instead of jumping (no seams), and the zero-padded border of each tile's map (the PDN's lost
margin, docs/method.md §7.3) counts little where a neighbour sees the same pixels from its inside.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np


def starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
  """Offsets of the tiles along one side of `length` pixels (module doc)."""
  if not 0 <= overlap < tile <= length:
    raise ValueError(f"tiles of {tile} px overlapping by {overlap} px do not fit a side of {length} px")
  out = list(range(0, length - tile + 1, tile - overlap))
  if out[-1] != length - tile:
    out.append(length - tile)
  return tuple(out)


def ramp(tile: int, overlap: int) -> np.ndarray:
  """[tile] float32: 1 inside, (d + 1) / (overlap + 1) at distance d < overlap from either end."""
  d = np.minimum(np.arange(tile), np.arange(tile)[::-1])
  return np.minimum(1.0, (d + 1.0) / (overlap + 1.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """T x T tiles over an H x W image, overlapping by `overlap` pixels."""

  size: tuple[int, int]  # (H, W) of the image the tiles cover
  tile: int
  overlap: int

  @functools.cached_property
  def boxes(self) -> tuple[tuple[int, int], ...]:
    """(top, left) of every tile, row by row."""
    ys, xs = (starts(n, self.tile, self.overlap) for n in self.size)
    return tuple((y, x) for y in ys for x in xs)

  @property
  def count(self) -> int:
    return len(self.boxes)

  @functools.cached_property
  def window(self) -> np.ndarray:
    """[T, T] float32 blending weights of one tile (module doc)."""
    r = ramp(self.tile, self.overlap)
    return np.outer(r, r)

  @functools.cached_property
  def coverage(self) -> np.ndarray:
    """[H, W] float32: the sum of the windows over every tile (> 0 everywhere: the tiles cover the image)."""
    out = np.zeros(self.size, np.float32)
    t = self.tile
    for y, x in self.boxes:
      out[y : y + t, x : x + t] += self.window
    return out


def from_model(model_cfg: Any) -> Tiling | None:
  """The tiling of a `config.ModelConfig` (`tile` > 0), else None (the whole image is the networks' input)."""
  tile = getattr(model_cfg, "tile", 0)
  if not tile:
    return None
  return Tiling(tuple(model_cfg.image_size), int(tile), int(model_cfg.tile_overlap))


def network_size(image_size: Sequence[int], tiling: Tiling | None) -> tuple[int, int]:
  """(H, W) of what the networks see: a tile, or the whole image."""
  return (tiling.tile, tiling.tile) if tiling else tuple(image_size)
