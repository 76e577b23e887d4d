"""The training images decoded once per run into one memory-mapped uint8 file (docs/method.md §4.1).

Decoding a 1024x1024 PNG costs ~33 ms, several times a training step, and the reference decodes every image
at every use. The training split is small (hundreds of images), so `decode_once` decodes each image once
into a file in a fresh folder of the system temp dir, and every process reads it through `np.memmap`:
grain's worker processes are spawned and receive the dataset pickled, so a cache held in RAM would be copied
into each worker, while a mapped file is shared through the page cache. A `DecodedImages` pickles as its
path and offsets and maps the file again in the process that reads it.

File layout: the N resized images [N, H, W, 3] (H x W = the model's image size; `preprocess.resize`, the
un-jittered network input before `to_float`/`normalize`), then each image at its original size [H_i, W_i, 3],
one after another.
The main process's object removes the folder when it is collected or at interpreter exit; copies never do.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from efficientad_jax.config import ImageSize
from efficientad_jax.data import pipeline, preprocess
from efficientad_jax.data.records import DataError

FILE_NAME = "images.u8"
MAX_THREADS = 8  # decoding threads at most (PIL releases the GIL while it decodes and resizes)
_REPLACE = "replace or remove the file, then run the same command again"
_FIX = "set TMPDIR to a folder on a larger disk, or pass --set data.decode_cache=false"
logger = logging.getLogger("efficientad_jax")


class DecodedImages:
  """Read-only access to the decoded training images; index i is record i of the split.

  Attributes:
    path: the mapped file.
    size: (H, W) of the resized images (`config.ImageSize`; an int is a square).
    shapes: ((H, W), ...) of the original images, one per record.
  """

  def __init__(self, path: str, size: int | Sequence[int], shapes: Sequence[tuple[int, int]], owner: bool = False):
    self.path, self.size = path, ImageSize(size)
    self.shapes = tuple((int(h), int(w)) for h, w in shapes)
    ends = np.cumsum([len(self.shapes) * self._small_bytes] + [h * w * 3 for h, w in self.shapes])
    self._offsets = tuple(int(e) for e in ends)  # offset of full image i; the last one is the file size
    self._map = None
    # Only the process that wrote the file deletes it (a copy in a worker leaves it to its owner).
    self._finalizer = weakref.finalize(self, _remove_folder, os.path.dirname(path), os.getpid()) if owner else None

  def __len__(self) -> int:
    return len(self.shapes)

  @property
  def _small_bytes(self) -> int:
    return self.size[0] * self.size[1] * 3

  @property
  def nbytes(self) -> int:
    return self._offsets[-1]

  def _bytes(self) -> np.ndarray:
    if self._map is None:  # mapped lazily: in a worker, on its first read
      self._map = np.memmap(self.path, np.uint8, mode="r", shape=(self.nbytes,)).view(np.ndarray)
    return self._map

  def offsets(self, index: int) -> tuple[int, int]:
    """Byte offsets of record `index`'s resized image and of its original-size image in the file."""
    return index * self._small_bytes, self._offsets[index]

  def small(self, index: int) -> np.ndarray:
    """[H, W, 3] uint8: `preprocess.resize(decoded image, size)` of record `index` (read-only)."""
    start = self.offsets(index)[0]
    return self._bytes()[start : start + self._small_bytes].reshape(*self.size, 3)

  def full(self, index: int) -> np.ndarray:
    """[H, W, 3] uint8: `preprocess.decode_image` of record `index` at its original size (read-only)."""
    h, w = self.shapes[index]
    return self._bytes()[self._offsets[index] : self._offsets[index + 1]].reshape(h, w, 3)

  def __getstate__(self) -> dict:
    return {"path": self.path, "size": self.size, "shapes": self.shapes}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"], state["size"], state["shapes"], owner=False)


def _remove_folder(folder: str, pid: int) -> None:
  if os.getpid() == pid:  # a forked child inherits the finalizer, not the file
    shutil.rmtree(folder, ignore_errors=True)


def _source(record: Any) -> tuple[Any, str]:
  parts = pipeline._parts(record, ())
  return parts["image"], parts["name"]


def _shape(record: Any) -> tuple[int, int]:
  """(H, W) from the image header, without decoding; a file PIL cannot open raises its DataError now."""
  source, name = _source(record)
  if isinstance(source, np.ndarray):
    return source.shape[:2]
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      return image.size[1], image.size[0]
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return preprocess.decode_image(source, name).shape[:2]  # raises the DataError naming the file


def _checked(fn, *args):
  try:
    return fn(*args)
  except DataError as e:
    raise DataError(f"{e}: {_REPLACE}") from None


def _write(fd: int, array: np.ndarray, offset: int) -> None:
  data = memoryview(np.ascontiguousarray(array)).cast("B")
  while data:  # pwrite may write less than asked; an error (a full disk) raises OSError, not SIGBUS
    done = os.pwrite(fd, data, offset)
    data, offset = data[done:], offset + done


def _decode_into(fd: int, images: DecodedImages, records: Sequence[Any], index: int) -> None:
  source, name = _source(records[index])
  rgb = preprocess.decode_image(source, name)
  if rgb.shape[:2] != images.shapes[index]:
    raise DataError(f"{name}: decoded size {rgb.shape[:2]} differs from its header's {images.shapes[index]}")
  small_at, full_at = images.offsets(index)
  _write(fd, preprocess.resize(rgb, images.size), small_at)
  _write(fd, rgb, full_at)


def _check_space(folder: str, needed: int) -> None:
  free = shutil.disk_usage(folder).free
  if free < needed:
    raise DataError(
      f"{folder}: decoding the training images once needs {needed} bytes "
      f"({needed / 2**20:.0f} MiB), {free} are free: {_FIX}"
    )


def _write_all(
  pool: concurrent.futures.ThreadPoolExecutor, folder: str, records: Sequence[Any], image_size: int | Sequence[int]
) -> DecodedImages:
  """Reads the sizes, checks the disk, then decodes and writes every record; the pool is shut down after."""
  shapes = list(pool.map(lambda i: _checked(_shape, records[i]), range(len(records))))
  images = DecodedImages(os.path.join(folder, FILE_NAME), image_size, shapes, owner=True)
  _check_space(folder, images.nbytes)
  logger.info("decoding %d training images once (%.0f MiB) into %s", len(images), images.nbytes / 2**20, folder)
  fd = os.open(images.path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
  try:
    list(pool.map(lambda i: _checked(_decode_into, fd, images, records, i), range(len(images))))
  except OSError as e:  # the disk filled up after the check (another writer)
    raise DataError(f"{folder}: writing the decoded training images failed ({e}): {_FIX}") from None
  finally:
    pool.shutdown(cancel_futures=True)  # after a failure too: no thread may write once fd is closed
    os.close(fd)
  return images


def decode_once(records: Sequence[Any], image_size: int | Sequence[int], threads: int = 0) -> DecodedImages:
  """Decodes every record (a `records.Sample` or a TFDS dict) once into a new mapped file.

  Args:
    records: the training split.
    image_size: S, the side of the resized copies.
    threads: decoding threads (0: one per core, at most MAX_THREADS).
  Returns:
    The owning `DecodedImages`: its folder goes when it is collected. A corrupt image raises the
    `DataError` naming its file (at the first failure, not after decoding the rest), a too small temp
    disk a `DataError` naming the folder; either way no folder is left behind.
  """
  if not len(records):
    raise DataError("the training split is empty")
  folder = tempfile.mkdtemp(prefix="efficientad_decoded_")
  pool = concurrent.futures.ThreadPoolExecutor(threads or min(MAX_THREADS, os.cpu_count() or 1))
  try:
    return _write_all(pool, folder, records, image_size)
  except BaseException:
    pool.shutdown(cancel_futures=True)
    shutil.rmtree(folder, ignore_errors=True)
    raise
