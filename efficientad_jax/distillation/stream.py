"""grain pipelines of teacher distillation (paper §3.1; docs/method.md §8): ImageNet images at two sizes.

One element is one ImageNet image, turned to grayscale with probability `data.grayscale_prob` (seeded by the
pipeline seed and the element's index, like every transform in `data.pipeline`), then resized twice:
'image' [S, S, 3] for the student (S = model.image_size) and 'backbone' [2S, 2S, 3] for the WideResNet target
(backbone.image_size), both ImageNet-normalised float32. The grayscale decision is shared, so both networks see the
same image.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from efficientad_jax.data import preprocess
from efficientad_jax.data.indexes import penalty_source
from efficientad_jax.data.pipeline import mark_flags_parsed, sub_seed, worker_count
from efficientad_jax.data.records import DataError
from efficientad_jax.distillation.config import DistillConfig


def image_source(spec: str, tfds_data_dir: str = "") -> Sequence[Any]:
  """An image folder (recursive .jpg/.jpeg/.png) or "tfds:imagenet2012" (its train split) as a random-access
  source; the same resolution as the training penalty images (`data.indexes.penalty_source`)."""
  if not spec:
    raise DataError("no ImageNet source: pass --imagenet DIR or --imagenet tfds:imagenet2012")
  return penalty_source(spec, tfds_data_dir)


def distill_element(
  record: Any,
  rng: np.random.Generator,
  *,
  image_size: int,
  backbone_size: int,
  gray_prob: float,
  mean: Sequence[float],
  std: Sequence[float],
) -> dict:
  """One image (a path or a TFDS dict with 'image') -> {'image': [S,S,3], 'backbone': [B,B,3]} float32."""
  source = record["image"] if isinstance(record, dict) else record
  name = str(source) if isinstance(source, (str, pathlib.Path)) else "imagenet record"
  rgb = preprocess.decode_image(source, name)
  if rng.uniform() < gray_prob:
    # torchvision RandomGrayscale on a PIL image: luma via convert('L'), replicated to 3 channels.
    rgb = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=-1)
  prep = lambda size: preprocess.model_input(rgb, size, mean, std)
  return {"image": prep(image_size), "backbone": prep(backbone_size)}


def _element_fn(cfg: DistillConfig):
  return functools.partial(
    distill_element,
    image_size=cfg.model.image_size,
    backbone_size=cfg.backbone.image_size,
    gray_prob=cfg.data.grayscale_prob,
    mean=cfg.data.mean,
    std=cfg.data.std,
  )


def local_batch_size(global_batch: int, process_count: int, device_count: int) -> int:
  """This process's share of the global batch; the batch must split evenly over processes and devices."""
  if global_batch % device_count or global_batch % process_count:
    raise ValueError(f"train.batch_size {global_batch} must be a multiple of the device count {device_count}")
  return global_batch // process_count


def _iterate(ds: grain.MapDataset, cfg: DistillConfig) -> grain.IterDataset:
  d = cfg.data
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, d.prefetch), prefetch_buffer_size=d.prefetch))
  if (workers := worker_count(d.num_workers)) > 0:
    mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def train_dataset(
  source: Sequence[Any], cfg: DistillConfig, local_batch: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """The infinite, reshuffled-per-epoch training stream: batches {'image', 'backbone'} of this process.

  The grayscale draw depends on the global element index only, so the union over processes is the
  single-process stream, and the iterator state (batches consumed) resumes it exactly.
  """
  if not len(source):
    raise DataError("the ImageNet source is empty")
  ds = grain.MapDataset.source(source).shuffle(sub_seed(cfg.train.seed, "distill_shuffle")).repeat()
  ds = ds.random_map(_element_fn(cfg), seed=sub_seed(cfg.train.seed, "distill_grayscale"))
  return _iterate(ds[process_index::process_count].batch(local_batch, drop_remainder=True), cfg)


def stats_dataset(
  source: Sequence[Any], cfg: DistillConfig, local_batch: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """A seeded sample of `num_stat_images` images (rounded down to whole global batches) for the target
  statistics, with the training transform (so the statistics describe what the student regresses)."""
  global_batch = local_batch * process_count
  n = min(cfg.target.num_stat_images, len(source)) // global_batch * global_batch
  if n == 0:
    raise DataError(
      f"target statistics need at least one batch of {global_batch} images "
      f"(target.num_stat_images {cfg.target.num_stat_images}, source has {len(source)})"
    )
  ds = grain.MapDataset.source(source).shuffle(sub_seed(cfg.train.seed, "distill_stats"))[:n]
  ds = ds.random_map(_element_fn(cfg), seed=sub_seed(cfg.train.seed, "distill_stats_grayscale"))
  return ds[process_index::process_count].batch(local_batch, drop_remainder=True)
