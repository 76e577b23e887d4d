"""EfficientAD's inference path, used by everything that predicts (paper section 3.4, docs/method.md §7):
images -> maps -> anomaly maps and scores.

Calibration (`raw_maps`), evaluation, the predict CLI, export and the benchmark all go through `predict`
(calibration through its first half, `raw_maps`, since quantiles do not exist yet at that point). The
saved model of method 'efficientad' reaches it through `SAVED_MODEL` (efficientad_jax/saved_model.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax.numpy as jnp

from efficientad_jax import config as config_lib
from efficientad_jax import models, tiles
from efficientad_jax.config import Config, MapConfig, ModelConfig
from efficientad_jax.efficientad.normalization import (
  MapQuantiles,
  TeacherStats,
  fit_map_quantiles,
  normalize_map,
  normalize_teacher,
)
from efficientad_jax.models import Models, resize
from efficientad_jax.serving import saved_model
from efficientad_jax.training import calibration, compiler


@flax.struct.dataclass
class Detector:
  """Everything inference needs, as one pytree: network params, teacher statistics, map quantiles."""

  params: dict  # {'teacher', 'student', 'autoencoder'} Flax params
  teacher_stats: TeacherStats
  quantiles: MapQuantiles


def raw_maps(nets: Models, params: dict, stats: TeacherStats, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Local and global anomaly maps before normalisation, float32 [B, h, w] each.

  map_st = mean_c (T_hat - S[:C])^2 (local, student vs teacher);
  map_ae = mean_c (A - S[C:])^2 (global, student vs autoencoder).

  Args:
    images: [B, S, S, 3] ImageNet-normalised images.
  """
  c = nets.teacher.out_channels
  t = normalize_teacher(nets.teacher.apply({"params": params["teacher"]}, images), stats)
  s = nets.student.apply({"params": params["student"]}, images).astype(jnp.float32)
  a = nets.autoencoder.apply({"params": params["autoencoder"]}, images, deterministic=True)
  map_st = jnp.mean(jnp.square(t - s[..., :c]), axis=-1)
  map_ae = jnp.mean(jnp.square(a.astype(jnp.float32) - s[..., c:]), axis=-1)
  return map_st, map_ae


def combine_maps(map_st: jnp.ndarray, map_ae: jnp.ndarray, q: MapQuantiles, cfg: MapConfig) -> jnp.ndarray:
  """combined = w_st * st' + w_ae * ae', each map normalised by its validation quantiles."""
  st = normalize_map(map_st, q.st_start, q.st_end, cfg.scale)
  ae = normalize_map(map_ae, q.ae_start, q.ae_end, cfg.scale)
  return cfg.st_weight * st + cfg.ae_weight * ae


def to_image_map(combined: jnp.ndarray, out_size: Sequence[int], pad: int) -> jnp.ndarray:
  """[B, h, w] -> zero-pad `pad` per side (the PDN's lost border) -> bilinear resize to [B, H, W]."""
  padded = jnp.pad(combined, ((0, 0), (pad, pad), (pad, pad)))
  return resize(padded[..., None], tuple(out_size))[..., 0]


def cut(images: jnp.ndarray, tiling: tiles.Tiling) -> jnp.ndarray:
  """[B, H, W, C] -> [B * n, T, T, C], image by image, each image's n tiles in `tiling.boxes` order."""
  t = tiling.tile
  parts = jnp.stack([images[:, y : y + t, x : x + t] for y, x in tiling.boxes], axis=1)
  return parts.reshape(-1, t, t, images.shape[-1])


def stitch(tile_maps: jnp.ndarray, tiling: tiles.Tiling) -> jnp.ndarray:
  """[B * n, T, T] tile maps -> [B, H, W]: the `tiling.window`-weighted mean where tiles overlap."""
  t, n = tiling.tile, tiling.count
  weighted = tile_maps.reshape(-1, n, t, t) * jnp.asarray(tiling.window)
  out = jnp.zeros((weighted.shape[0], *tiling.size), jnp.float32)
  for k, (y, x) in enumerate(tiling.boxes):
    out = out.at[:, y : y + t, x : x + t].add(weighted[:, k])
  return out / jnp.asarray(tiling.coverage)


def network_input(images: jnp.ndarray, tiling: tiles.Tiling | None) -> jnp.ndarray:
  """What the networks see of images [B, H, W, 3]: the images, or their tiles [B * n, T, T, 3]."""
  return images if tiling is None else cut(images, tiling)


def per_image(x: jnp.ndarray, batch: int) -> jnp.ndarray:
  """[B * n, h, ...] outputs of tiles -> [B, n * h, ...], each image's tiles stacked along the rows (in
  `tiling.boxes` order): one row per image again, so a padded batch can be cut back to its real images, and
  per-image means are the means over every tile. Untiled outputs pass unchanged."""
  return x.reshape(batch, -1, *x.shape[2:])


def predict(
  nets: Models,
  cfg: MapConfig,
  detector: Detector,
  images: jnp.ndarray,
  out_size: Sequence[int],
  tiling: tiles.Tiling | None = None,
) -> dict[str, jnp.ndarray]:
  """Images [B, H, W, 3] -> {'map_st', 'map_ae' (raw, [B, h, w]), 'map_combined' ([B, h, w]),
  'anomaly_map' ([B, *out_size], at the original image size), 'score' ([B], max of anomaly_map)}.

  With tiles (`tiling`), the networks see the n tiles of each image as one batch; each tile's map is padded and
  resized to T x T, stitched into [B, H, W] (docs/method.md §7.5), then resized to `out_size`. The three
  network-grid maps are then [B, n * h, w] (`per_image`: each image's tile maps stacked along the rows).
  Always the same keys and types (no mode-dependent returns). Maps are float32 whatever the compute dtype.
  """
  map_st, map_ae = raw_maps(nets, detector.params, detector.teacher_stats, network_input(images, tiling))
  combined = combine_maps(map_st, map_ae, detector.quantiles, cfg)
  if tiling is None:
    anomaly_map = to_image_map(combined, out_size, cfg.pad)
  else:
    stitched = stitch(to_image_map(combined, (tiling.tile, tiling.tile), cfg.pad), tiling)
    anomaly_map = stitched if tuple(out_size) == tiling.size else resize(stitched[..., None], tuple(out_size))[..., 0]
  b = images.shape[0]
  return {
    "map_st": per_image(map_st, b),
    "map_ae": per_image(map_ae, b),
    "map_combined": per_image(combined, b),
    "anomaly_map": anomaly_map,
    "score": jnp.max(anomaly_map, axis=(1, 2)),
  }


def make_predict_fn(
  nets: Models, cfg: MapConfig, tiling: tiles.Tiling | None = None
) -> Callable[..., dict[str, jnp.ndarray]]:
  """The jitted `predict`: fn(detector, images, out_size) with out_size static (one compile per size)."""
  return compiler.jit(functools.partial(predict, nets, cfg, tiling=tiling), static_argnames="out_size")


@functools.lru_cache(maxsize=8)
def make_raw_maps_fn(
  nets: Models, tiling: tiles.Tiling | None = None
) -> Callable[..., tuple[jnp.ndarray, jnp.ndarray]]:
  """The jitted first half of `predict`, for calibration: fn(params, stats, images) -> (map_st, map_ae), per
  image ([B, n * h, w] with tiles, `per_image`: the quantiles are taken over every tile's map). One per
  (networks, tiles): the runs of one process (a group's members) calibrate with one compilation."""

  def raw(params, stats, images):
    maps = raw_maps(nets, params, stats, network_input(images, tiling))
    return tuple(per_image(m, images.shape[0]) for m in maps)

  return compiler.jit(raw)


# --- The saved model (method 'efficientad').


@functools.lru_cache(maxsize=8)
def compiled_predict(model_cfg: ModelConfig, map_cfg: MapConfig) -> tuple[Models, Callable]:
  """(nets, jitted predict) per config pair: models loaded twice in one process share compilations."""
  nets = models.build(model_cfg)
  return nets, make_predict_fn(nets, map_cfg, tiles.from_model(model_cfg))


def calibrate(
  cfg: Config, params: dict, stats: TeacherStats, records: Any, batch_size: int
) -> tuple[Detector, float, list[float]]:
  """(the complete EfficientAD detector, decision threshold, validation scores sorted) from validation normals
  (docs/method.md §7.2, §7.4):
  the map quantiles are fitted on the raw local and global maps, then the threshold on the scores of the
  calibrated detector. The predict function is the one `saved_model.load` uses for `cfg` (`compiled_predict`)."""
  nets, predict_fn = compiled_predict(cfg.model, cfg.maps)
  raw = make_raw_maps_fn(nets, tiles.from_model(cfg.model))
  raw_maps = lambda _, images, out_size: dict(zip(("map_st", "map_ae"), raw(params, stats, images)))
  maps = calibration.outputs(raw_maps, None, records, ("map_st", "map_ae"), batch_size)
  quantiles = fit_map_quantiles(maps["map_st"], maps["map_ae"], cfg.maps.q_start, cfg.maps.q_end)
  detector = Detector(params=params, teacher_stats=stats, quantiles=quantiles)
  return detector, *calibration.threshold(predict_fn, detector, records, cfg.maps.threshold_quantile, batch_size)


def _predict_pair(cfg: Config) -> tuple[Callable[..., dict], Callable[..., dict]]:
  nets, jitted = compiled_predict(cfg.model, cfg.maps)
  return functools.partial(predict, nets, cfg.maps, tiling=tiles.from_model(cfg.model)), jitted


def _to_arrays(detector: Detector) -> dict:
  """The on-disk tree: {'params', 'teacher_stats': {'mean', 'std'}, 'quantiles': {'st_start', ...}}."""
  return {
    "params": detector.params,
    "teacher_stats": {"mean": detector.teacher_stats.mean, "std": detector.teacher_stats.std},
    "quantiles": {k: getattr(detector.quantiles, k) for k in ("st_start", "st_end", "ae_start", "ae_end")},
  }


def _from_arrays(tree: dict) -> Detector:
  return Detector(
    params=tree["params"],
    teacher_stats=TeacherStats(**tree["teacher_stats"]),
    quantiles=MapQuantiles(**tree["quantiles"]),
  )


SAVED_MODEL = saved_model.Method(
  name="efficientad",
  config=lambda d: config_lib.from_dict(Config, d),
  inputs=saved_model.config_inputs,
  predict=_predict_pair,
  to_arrays=_to_arrays,
  from_arrays=_from_arrays,
)
