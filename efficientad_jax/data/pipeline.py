"""grain pipelines: the seeded training stream and the ordered evaluation datasets (docs/method.md §4, §6).

Records are either `records.Sample` (a file index) or dicts read from our TFDS builders through
`tfds.data_source` (see `tfds_builders.py`); `_parts` maps both to the same fields. Every random
transform is a `random_map` seeded from the pipeline seed and the element's global index, so a
stream is a pure function of (index, seed) and its iterator state is one integer. With a decode cache
(`cache.decode_once`) the training images are read from one memory-mapped file instead of decoded at
every use: the same values, bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from efficientad_jax.config import ImageSize
from efficientad_jax.data import preprocess, records
from efficientad_jax.data.records import DataError, Sample

MAX_AUTO_WORKERS = 16  # num_workers=-1 never starts more worker processes than this


def worker_count(requested: int) -> int:
  """`InputConfig.num_workers` -> grain worker processes: requested >= 0 as is; -1 (auto): none on a
  CPU-only machine (XLA's step needs the cores there), else one per core beyond the first, at most
  MAX_AUTO_WORKERS."""
  if requested >= 0:
    return requested
  if requested != -1:
    raise ValueError(f"num_workers must be >= 0, or -1 (auto), got {requested}")
  import jax

  if jax.default_backend() == "cpu":
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(0, min(cores - 1, MAX_AUTO_WORKERS))


def sub_seed(seed: int, name: str) -> int:
  """A stable per-stage seed (shuffle, jitter, penalty draw independent of one another)."""
  return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _parts(record: Any, specs: Sequence[records.DefectSpec]) -> dict:
  """Sample or TFDS dict -> {'image','name','id','label','defect','loco_type','mask','channels','specs'}."""
  if isinstance(record, Sample):
    return {
      "image": record.image,
      "name": record.image,
      "id": record.id,
      "label": record.label,
      "defect": record.defect,
      "loco_type": record.loco_type,
      "mask": record.mask,
      "channels": list(record.channels),
      "specs": specs,
    }
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  mask = record.get("mask")
  config = text(record.get("defects_config", b"")) if "defects_config" in record else ""
  if config:
    specs = tuple(records.parse_defect(e, "TFDS record defects_config") for e in json.loads(config))
  rid = text(record["id"])
  return {
    "image": record["image"],
    "name": f"tfds record {rid}",
    "id": rid,
    "label": int(record["label"]),
    "defect": text(record["defect"]),
    "loco_type": text(record.get("loco_type", b"")),
    "mask": mask if mask is not None and len(mask) else None,
    "channels": list(record.get("channels", ())),
    "specs": specs,
  }


def random_tile(element: dict, rng: np.random.Generator, tiling: Any) -> dict:
  """One of the image's tiles (`tiles.Tiling`), drawn uniformly, the same for every array of the element (the
  student and the autoencoder see the same part of the image)."""
  y, x = tiling.boxes[int(rng.integers(tiling.count))]
  t = tiling.tile
  return {k: v[y : y + t, x : x + t] for k, v in element.items()}


def train_element(
  record: Any, rng: np.random.Generator, image_size: int | Sequence[int], jitter: tuple[float, float], tiling=None
) -> dict:
  """One training image -> {'image': [S,S,3], 'image_ae': [S,S,3]} uint8, resized, not yet normalised (the
  jitted step normalises: `train_step.normalize_images`; a quarter of the bytes to move and copy).

  'image_ae' is the autoencoder's input: ONE colour jitter (kind and factor drawn from `rng`, the
  element's seeded generator) applied to the decoded full-resolution image, then resized, as the
  reference does (paper section 3.3; docs/method.md §4.1). With tiles (`tiling`), one tile of both, drawn after
  the jitter (`random_tile`).
  """
  parts = _parts(record, ())
  rgb = preprocess.decode_image(parts["image"], parts["name"])
  kind, factor = preprocess.draw_jitter(rng, *jitter)
  element = {
    "image": preprocess.resize(rgb, image_size),
    "image_ae": preprocess.jittered_resized(rgb, kind, factor, image_size),
  }
  return element if tiling is None else random_tile(element, rng, tiling)


def cached_train_element(
  index: int, rng: np.random.Generator, cache: Any, jitter: tuple[float, float], tiling=None
) -> dict:
  """`train_element` of record `index` read from a decode cache (`cache.DecodedImages`): the same arrays.

  'image' is the cached resized image (`preprocess.resize` of the decoded image); 'image_ae' jitters the
  cached full-resolution image with the same `draw_jitter` draw (docs/method.md §4.1).
  """
  kind, factor = preprocess.draw_jitter(rng, *jitter)
  element = {
    "image": cache.small(index),
    "image_ae": preprocess.jittered_resized(cache.full(index), kind, factor, cache.size),
  }
  return element if tiling is None else random_tile(element, rng, tiling)


def penalty_element(
  record: Any, rng: np.random.Generator, image_size: int | Sequence[int], resize_to: int, gray_prob: float
) -> np.ndarray:
  """One penalty image (a path, or a TFDS dict with 'image') -> [S, S, 3] uint8, not yet normalised
  (`preprocess.penalty_crop`; docs/method.md §4.1)."""
  source = record["image"] if isinstance(record, dict) else record
  name = str(source) if isinstance(source, (str, pathlib.Path)) else "penalty record"
  return preprocess.penalty_crop(
    preprocess.decode_image(source, name), preprocess.draw_gray(rng, gray_prob), resize_to, image_size
  )


def _merge(pair: tuple[dict, np.ndarray]) -> dict:
  return {**pair[0], "penalty": pair[1]}


def mark_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app they must be marked parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(
  samples: Sequence[Any],
  penalty: Sequence[Any] | None,
  *,
  image_size: int | Sequence[int],
  batch_size: int,
  seed: int,
  data_cfg,
  process_index: int = 0,
  process_count: int = 1,
  cache: Any = None,
  tiling: Any = None,
) -> grain.IterDataset:
  """The infinite training stream of this process: batches of dicts of NumPy arrays.

  Batch: {'image': [B,S,S,3], 'image_ae': [B,S,S,3], 'penalty': [B,S,S,3]} uint8 NHWC, resized (S x S: the
  image size; with tiles (`tiles.Tiling`) one tile of each image, and penalty crops of the tile's size), NOT
  normalised (the jitted step normalises: `train_step.normalize_images`); no 'penalty' key when `penalty` is
  None. B = batch_size (this process's share).
  Order: source -> shuffle(seed, reshuffled each epoch) -> repeat -> random_map -> this process's
  slice [process_index::process_count] -> batch -> iterator with prefetch (docs/method.md §4, §6; STYLE rule 5).
  `cache`: `cache.decode_once(samples, image_size)` (what `api.make_datasets` passes when
  `data_cfg.decode_cache`): the source is then the record indices and the images are read from the
  cache; the stream is the same, bit for bit. Without one every use decodes its file. Worker
  processes: `worker_count(data_cfg.num_workers)`.
  """
  if not len(samples):
    raise DataError("the training split is empty")
  jitter = (data_cfg.jitter_low, data_cfg.jitter_high)
  if cache is None:
    source = samples
    element = functools.partial(train_element, image_size=image_size, jitter=jitter, tiling=tiling)
  else:
    if len(cache) != len(samples) or cache.size != ImageSize(image_size):
      raise ValueError(
        f"decode cache of {len(cache)} images at {cache.size} px does not match "
        f"{len(samples)} training images at {ImageSize(image_size)} px"
      )
    # Indices shuffle exactly as the records do (the permutation depends on the length and seed only).
    source = range(len(samples))
    element = functools.partial(cached_train_element, cache=cache, jitter=jitter, tiling=tiling)
  ds = grain.MapDataset.source(source).shuffle(sub_seed(seed, "shuffle")).repeat()
  ds = ds.random_map(element, seed=sub_seed(seed, "jitter"))
  if penalty is not None:
    crop = image_size if tiling is None else tiling.tile
    ds = grain.experimental.ZipMapDataset([ds, _penalty_images(penalty, crop, seed, data_cfg)]).map(_merge)
  # Shard after the random map: the randomness depends on the global index only, so the union
  # over processes is the single-process stream.
  ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=max(1, data_cfg.prefetch), prefetch_buffer_size=data_cfg.prefetch)
  )
  workers = worker_count(data_cfg.num_workers)
  if workers > 0:
    mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def _penalty_images(penalty: Sequence[Any], image_size: int | Sequence[int], seed: int, data_cfg) -> grain.MapDataset:
  """The infinite, seeded stream of single penalty images [S, S, 3] uint8 (`penalty_element`)."""
  if not len(penalty):
    raise DataError("the penalty source is empty")
  pen = grain.MapDataset.source(penalty).shuffle(sub_seed(seed, "penalty_shuffle")).repeat()
  return pen.random_map(
    functools.partial(
      penalty_element,
      image_size=image_size,
      resize_to=data_cfg.penalty_resize,
      gray_prob=data_cfg.penalty_grayscale_prob,
    ),
    seed=sub_seed(seed, "penalty"),
  )


def penalty_batches(
  penalty: Sequence[Any],
  *,
  image_size: int | Sequence[int],
  batch_size: int,
  seed: int,
  data_cfg,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Penalty images alone, in batches indexed by step: `ds[k]` is [B, S, S, 3] float32, normalised, a pure
  function of (k, seed), so a resumed run needs no iterator state. B = batch_size (this process's share); the
  same stream, seeds and process slicing as the penalty images of `train_dataset`."""
  pen = _penalty_images(penalty, image_size, seed, data_cfg)
  normalise = functools.partial(preprocess.network_input, mean=data_cfg.mean, std=data_cfg.std)
  return pen[process_index::process_count].batch(batch_size, drop_remainder=True).map(normalise)


def eval_element(
  record: Any, image_size: int | Sequence[int], mean, std, specs: Sequence[records.DefectSpec] = ()
) -> dict:
  """One evaluation image -> its record (docs/method.md §7, §9). Masks stay at the original resolution.

  Returns:
    {'image': [S,S,3] float32 normalised, 'orig_size': int32 [2] (H, W), 'label': int,
     'defect': str, 'loco_type': str, 'id': str, 'mask': bool [H,W] (zeros for normal images;
     LOCO: the union of its channels), 'channels': tuple of LOCO channel dicts
     {'mask': bool [H,W], 'defect', 'pixel_value', 'area', 'saturation_area'} (else empty)}.
  """
  p = _parts(record, specs)
  rgb = preprocess.decode_image(p["image"], p["name"])
  return _eval_record(p, rgb.shape[:2], preprocess.model_input(rgb, image_size, mean, std))


def cached_eval_element(
  index: int, samples: Sequence[Any], cache: Any, mean, std, specs: Sequence[records.DefectSpec] = ()
) -> dict:
  """`eval_element` of training record `index`, its image read from a decode cache (the same record)."""
  x = preprocess.network_input(cache.small(index), mean, std)
  return _eval_record(_parts(samples[index], specs), cache.shapes[index], x)


def _eval_record(p: dict, hw: tuple[int, int], x: np.ndarray) -> dict:
  """`_parts` output, the image's (H, W) and its network input -> the eval record (masks read here)."""
  hw = tuple(hw)
  mask = np.zeros(hw, bool)
  if p["mask"] is not None:
    mask = preprocess.load_mask(p["mask"], hw, _name(p["mask"], p["name"], "mask"))
  channels = []
  for i, png in enumerate(p["channels"]):
    name = _name(png, p["name"], f"channel {i}")
    raw = preprocess.decode_gray(png, name)
    if raw.shape != hw:
      raise DataError(f"{name}: mask size {raw.shape} (H, W) differs from its image's {hw}")
    channels.append(records.loco_channel(raw, p["specs"], name))
    mask |= channels[-1]["mask"]
  return {
    "image": x,
    "orig_size": np.asarray(hw, np.int32),
    "label": p["label"],
    "defect": p["defect"],
    "loco_type": p["loco_type"],
    "id": p["id"],
    "mask": mask,
    "channels": tuple(channels),
  }


def _name(source: Any, image_name: str, what: str) -> str:
  return str(source) if isinstance(source, (str, pathlib.Path)) else f"{image_name} ({what})"


def eval_dataset(
  samples: Sequence[Any], *, image_size: int | Sequence[int], data_cfg, specs: Sequence[records.DefectSpec] = ()
) -> grain.MapDataset:
  """Ordered, unshuffled evaluation records (format: `eval_element`); index it or iterate it."""
  return grain.MapDataset.source(samples).map(
    functools.partial(eval_element, image_size=image_size, mean=data_cfg.mean, std=data_cfg.std, specs=specs)
  )


def cached_eval_dataset(
  samples: Sequence[Any], cache: Any, *, data_cfg, specs: Sequence[records.DefectSpec] = ()
) -> grain.MapDataset:
  """`eval_dataset` of the training split whose images `cache` holds (`cache.decode_once(samples, S)`)."""
  return grain.MapDataset.source(range(len(samples))).map(
    functools.partial(
      cached_eval_element, samples=samples, cache=cache, mean=data_cfg.mean, std=data_cfg.std, specs=specs
    )
  )


def collate_eval(elements: Sequence[dict]) -> dict:
  """Batches eval records: 'image' stacked to [B,S,S,3], 'label' int32 [B], the rest as lists."""
  out = {k: [e[k] for e in elements] for k in elements[0]}
  out["image"] = np.stack(out["image"])
  out["label"] = np.asarray(out["label"], np.int32)
  return out


def eval_batches(ds: grain.MapDataset, batch_size: int) -> grain.MapDataset:
  """`eval_dataset` in batches (the last one smaller), for batched inference."""
  return ds.batch(batch_size, drop_remainder=False, batch_fn=collate_eval)
