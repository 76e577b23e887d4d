"""Running a network over records: fixed-size batches grouped by original image size (`size_batches`,
`ordered_batches`) and the one way to apply a jitted function to them (`map_batches`), used by calibration,
evaluation, teacher statistics and AST's feature extraction (docs/method.md §7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import numpy as np


def size_batches(
  records: Iterable[tuple[int, dict]], batch_size: int
) -> Iterator[tuple[tuple[int, int], list[int], np.ndarray]]:
  """Groups (index, record) by original size into batches of exactly `batch_size` images.

  A size's last batch is padded by repeating its last image, so each original size has one batch
  shape and the predict function compiles once per size (the output size is a static argument).

  Yields:
    ((H, W), indices of the real images, images [batch_size, S, S, 3] float32).
  """
  buckets: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

  def stack(bucket):
    images = [image for _, image in bucket]
    images += [images[-1]] * (batch_size - len(images))
    return [i for i, _ in bucket], np.stack(images)

  for index, record in records:
    size = tuple(int(v) for v in record["orig_size"])
    bucket = buckets.setdefault(size, [])
    bucket.append((index, record["image"]))
    if len(bucket) == batch_size:
      yield (size, *stack(bucket))
      buckets[size] = []
  for size, bucket in buckets.items():
    if bucket:
      yield (size, *stack(bucket))


def map_batches(
  fn: Callable[[np.ndarray, tuple[int, int]], Any], batches: Iterable[tuple[tuple[int, int], list[int], np.ndarray]]
) -> Iterator[tuple[list[int], Any]]:
  """Applies a (jitted) `fn(images, out_size)` to each batch of `size_batches` / `ordered_batches`.

  The one way every method runs a network over records: calibration, evaluation, teacher statistics and AST's
  features. Yields (indices of the real images, fn's output on the host with the padding images dropped: an
  array, or a dict of arrays).
  """
  for size, indices, images in batches:
    out, n = fn(images, size), len(indices)
    if isinstance(out, dict):
      yield indices, {k: np.asarray(v)[:n] for k, v in out.items()}
    else:
      yield indices, np.asarray(out)[:n]


def ordered_batches(records: Any, batch_size: int) -> Iterator[tuple[tuple[int, int], list[int], np.ndarray]]:
  """`size_batches` over eval records in their order (indices 0..N-1)."""
  return size_batches(enumerate(ordered(records)), batch_size)


def ordered(records: Any) -> Iterator[dict]:
  """Records in order; a grain MapDataset is decoded by a few threads ahead of the device."""
  if isinstance(records, grain.MapDataset):
    return iter(records.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)))
  return iter(records)
