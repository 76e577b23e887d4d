"""EfficientAD-AST: the networks, `build(cfg)`, the one inference path and the saved-model round trip.

Inference (images -> maps), method name 'efficientad_ast':
  f = EfficientNet trunk(images)        [B, g, g, C]   (C = 304, g = S / 32 = 24 at S = 768)
  p = positional encoding               [B, g, g, P]   (P = 32)
  z = flow(f, p)                        teacher output [B, g, g, C]
  s = student([f | p])                  [B, g, g, 2C]
  a = autoencoder(f)                    [B, g, g, C]
  map_st = mean_c (z - s[:C])^2;  map_ae = mean_c (a - s[C:])^2
  map_combined = st_weight * map_st + ae_weight * map_ae   (no quantile normalisation)
  anomaly_map = bilinear resize of map_combined to the original size (NO padding);  score = max.
`predict` returns the same keys as `efficientad_jax.efficientad.inference.predict`, so evaluation, export and the
benchmark work unchanged. AST has no teacher normalisation and no map normalisation: its detector is the
params dict {'backbone', 'flow', 'student', 'student_stats' (BatchNorm running statistics), 'autoencoder'},
saved by `saved_model.save(path, METHOD, params, meta)` as arrays/{'params'} through `SAVED_MODEL`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficientad_jax import config as config_lib
from efficientad_jax.efficientad_ast.config import AstConfig
from efficientad_jax.models import efficientnet, resize
from efficientad_jax.models.feature_autoencoder import FeatureAutoencoder
from efficientad_jax.models.flow import ConditionalFlow, positional_encoding
from efficientad_jax.models.residual_student import ResidualStudent
from efficientad_jax.serving import saved_model
from efficientad_jax.training import compiler

METHOD = "efficientad_ast"


class Nets(NamedTuple):
  backbone: efficientnet.EfficientNetTrunk
  flow: ConditionalFlow
  student: ResidualStudent
  autoencoder: FeatureAutoencoder
  channels: int  # C, feature channels
  grid: int  # g, feature grid side
  pos_channels: int  # P


def build(cfg: AstConfig) -> Nets:
  """The four networks for `cfg` (B5 by default: C = 304, g = image_size / 32)."""
  stride = efficientnet.feature_stride(cfg.backbone.stages)
  if cfg.model.image_size % stride:
    raise ValueError(f"image_size {cfg.model.image_size} must be a multiple of the backbone stride {stride}")
  dtype = jnp.dtype(cfg.model.dtype)
  c = efficientnet.feature_channels(cfg.backbone.width, cfg.backbone.stages)
  m, p = cfg.model, cfg.model.pos_channels
  return Nets(
    backbone=efficientnet.EfficientNetTrunk(
      cfg.backbone.width, cfg.backbone.depth, cfg.backbone.stages, cfg.backbone.bn_eps
    ),
    flow=ConditionalFlow(c, p, cfg.flow.blocks, cfg.flow.hidden, cfg.flow.kernel, cfg.flow.clamp, cfg.flow.seed, dtype),
    student=ResidualStudent(
      c + p, 2 * c, m.student_hidden, m.student_blocks, m.student_kernel, m.leaky_slope, m.bn_momentum, m.bn_eps, dtype
    ),
    autoencoder=FeatureAutoencoder(c, c, m.ae_channels, m.ae_dropout, dtype),
    channels=c,
    grid=cfg.model.image_size // stride,
    pos_channels=p,
  )


def init_params(nets: Nets, key: jax.Array, image_size: int) -> dict:
  """Fresh {'backbone', 'flow', 'student', 'student_stats', 'autoencoder'} (backbone: random, see trainer).

  Jitted: an eager init of the ~400 backbone layers dispatches (and compiles) every op one by one.
  """
  g, c, p = nets.grid, nets.channels, nets.pos_channels

  def init(key):
    kb, kf, ks, ka = jax.random.split(key, 4)
    f = jnp.zeros((1, g, g, c))
    student = nets.student.init(ks, jnp.zeros((1, g, g, c + p)))
    return {
      "backbone": nets.backbone.init(kb, jnp.zeros((1, image_size, image_size, 3)))["params"],
      "flow": nets.flow.init(kf, f, jnp.zeros((1, g, g, p)))["params"],
      "student": student["params"],
      "student_stats": student["batch_stats"],
      "autoencoder": nets.autoencoder.init(ka, f)["params"],
    }

  return jax.jit(init)(key)


def cond(nets: Nets, batch: int) -> jnp.ndarray:
  """The positional encoding [batch, g, g, P] (a constant of the grid)."""
  pe = jnp.asarray(positional_encoding(nets.pos_channels, nets.grid, nets.grid))
  return jnp.broadcast_to(pe, (batch, *pe.shape))


def features(nets: Nets, backbone: dict, images: jnp.ndarray) -> jnp.ndarray:
  """images [B, S, S, 3] (ImageNet-normalised) -> backbone features [B, g, g, C] float32."""
  return nets.backbone.apply({"params": backbone}, images).astype(jnp.float32)


def teacher(nets: Nets, flow: dict, f: jnp.ndarray) -> jnp.ndarray:
  """The frozen teacher's output z [B, g, g, C] for features f."""
  z, _ = nets.flow.apply({"params": flow}, f, cond(nets, f.shape[0]))
  return z


def maps_from_features(nets: Nets, params: dict, f: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(map_st, map_ae), float32 [B, g, g] each, from backbone features (module doc)."""
  c = nets.channels
  z = teacher(nets, params["flow"], f)
  s = nets.student.apply(
    {"params": params["student"], "batch_stats": params["student_stats"]},
    jnp.concatenate([f, cond(nets, f.shape[0])], axis=-1),
  ).astype(jnp.float32)
  a = nets.autoencoder.apply({"params": params["autoencoder"]}, f, deterministic=True).astype(jnp.float32)
  return jnp.mean(jnp.square(z - s[..., :c]), -1), jnp.mean(jnp.square(a - s[..., c:]), -1)


def predict(
  nets: Nets, cfg: AstConfig, params: dict, images: jnp.ndarray, out_size: Sequence[int]
) -> dict[str, jnp.ndarray]:
  """Images [B, S, S, 3] -> {'map_st', 'map_ae', 'map_combined' ([B, g, g]), 'anomaly_map' ([B, *out_size]),
  'score' ([B])}: the keys of `efficientad_jax.efficientad.inference.predict`."""
  map_st, map_ae = maps_from_features(nets, params, features(nets, params["backbone"], images))
  combined = cfg.maps.st_weight * map_st + cfg.maps.ae_weight * map_ae
  anomaly_map = resize(combined[..., None], tuple(out_size))[..., 0]
  return {
    "map_st": map_st,
    "map_ae": map_ae,
    "map_combined": combined,
    "anomaly_map": anomaly_map,
    "score": jnp.max(anomaly_map, axis=(1, 2)),
  }


def make_ast_predict_fn(nets: Nets, cfg: AstConfig) -> Callable[..., dict[str, jnp.ndarray]]:
  """The jitted `predict`: fn(params, images, out_size) with out_size static (one compile per size)."""
  return compiler.jit(functools.partial(predict, nets, cfg), static_argnames="out_size")


# --- The saved model.


@functools.lru_cache(maxsize=4)
def compiled_predict(cfg: AstConfig) -> tuple[Nets, Callable]:
  """(nets, jitted predict) per config: models loaded twice in one process share compilations."""
  nets = build(cfg)
  return nets, make_ast_predict_fn(nets, cfg)


def _predict_pair(cfg: AstConfig) -> tuple[Callable[..., dict], Callable[..., dict]]:
  nets, jitted = compiled_predict(cfg)
  return functools.partial(predict, nets, cfg), jitted


SAVED_MODEL = saved_model.Method(
  name=METHOD,
  config=lambda d: config_lib.from_dict(AstConfig, d),
  inputs=saved_model.config_inputs,
  predict=_predict_pair,
  to_arrays=lambda params: {"params": params},
  from_arrays=lambda tree: tree["params"],
)  # models saved before: also identity statistics, unused
