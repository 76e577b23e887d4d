"""Teacher distillation (docs/method.md §8, paper section 3.1): the WideResNet target, the pure step, the run.

Target for an image at backbone_size (512): WideResNet-101-2 layer2 F2 [64, 64, 512] and layer3 F3
[32, 32, 1024]. Per layer, every pixel's 3x3 neighbourhood is unfolded (stride 1, zero pad 1, channel-major
like `torch.nn.functional.unfold`: index c * 9 + 3 * dy + dx) and the 9C vector adaptively average-pooled to
`layer_dim` (1024); layer3's grid is resized bilinearly (half-pixel, no antialias) to layer2's; the two
vectors are stacked [layer2 | layer3] (2048) and pooled to `channels` (384) -> target [64, 64, 384]
(PatchCore's aggregation). Pooling after unfolding is linear per pixel, so it is computed as a fixed 3x3 conv
(or a 3x3 mean when bins cover whole channels) and never materialises the 9C vectors; resizing commutes with
it (one acts on pixels, the other on channels).

The student (padded PDN, image_size -> image_size / 4 = 64) regresses the per-channel normalised target with
MSE; only the student is differentiated, the backbone is a frozen argument loaded from the `.pth`, never
checkpointed. `distill(cfg, workdir)` runs it resumably and writes RUN/teacher for `weights.load_teacher`.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from efficientad_jax import backend, checkpoint, distill_data, normalization, train_step, trainer, weights
from efficientad_jax.config import DistillConfig, OptimConfig
from efficientad_jax.losses import mse
from efficientad_jax.models import PDN, pdn_output_size, resize, wide_resnet
from efficientad_jax.normalization import TeacherStats
from efficientad_jax.train_step import TrainState

log = logging.getLogger("efficientad_jax")
_HIGHEST = jax.lax.Precision.HIGHEST  # the pooling is an average: keep it exact, not TF32


def adaptive_pool_matrix(length: int, out: int) -> jnp.ndarray:
  """[length, out] float32 matrix P with v @ P = PyTorch adaptive_avg_pool1d(v, out).

  Bin o averages v[start_o:end_o], start_o = floor(o * length / out), end_o = ceil((o + 1) * length / out).
  Built from iotas inside jit (a few KB of constants instead of a length x out literal in the program).
  """
  o = np.arange(out)
  start = jnp.asarray(o * length // out)
  end = jnp.asarray(-((-(o + 1) * length) // out))  # ceil division
  i = jnp.arange(length)[:, None]
  inside = (i >= start) & (i < end)
  return inside.astype(jnp.float32) / (end - start).astype(jnp.float32)


def unfold_pool(x: jnp.ndarray, out: int) -> jnp.ndarray:
  """adaptive_avg_pool1d(unfold_3x3(x), out) per pixel: [B, H, W, C] -> [B, H, W, out] float32.

  unfold: stride 1, zero pad 1, channel-major (c * 9 + 3 * dy + dx). The composition is linear, i.e. a 3x3
  conv with kernel P reshaped to [C, 3, 3, out]; when every bin holds k whole channels (9C = 9 k out, e.g.
  layer3 1024 -> 1024) it is a 3x3 mean (zeros counted) followed by a mean over k channels.
  """
  x = x.astype(jnp.float32)
  c = x.shape[-1]
  if c % out == 0:  # every bin = 9 k consecutive values = k whole channels
    k = c // out
    y = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0))) / 9.0
    return y.reshape(*y.shape[:-1], out, k).mean(-1)
  kernel = adaptive_pool_matrix(9 * c, out).reshape(c, 3, 3, out).transpose(1, 2, 0, 3)  # HWIO
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)


def aggregate(layer2: jnp.ndarray, layer3: jnp.ndarray, layer_dim: int, channels: int) -> jnp.ndarray:
  """[B, h, w, C2], [B, h/2, w/2, C3] -> [B, h, w, channels] float32: the distillation target (module doc)."""
  f2 = unfold_pool(layer2, layer_dim)
  f3 = resize(unfold_pool(layer3, layer_dim), layer2.shape[1:3])
  stacked = jnp.concatenate([f2, f3], axis=-1)  # layer-major, as PatchCore stacks per-layer vectors
  return jnp.einsum("bhwl,lo->bhwo", stacked, adaptive_pool_matrix(2 * layer_dim, channels), precision=_HIGHEST)


def target_features(backbone: wide_resnet.WideResNet, cfg: DistillConfig, variables: dict,
                    images: jnp.ndarray) -> jnp.ndarray:
  """Backbone images [B, 2S, 2S, 3] -> raw (unnormalised) target [B, S/4, S/4, channels]."""
  layer2, layer3 = backbone.apply(variables, images)
  return aggregate(layer2, layer3, cfg.layer_dim, cfg.channels)


def check_sizes(cfg: DistillConfig) -> None:
  """The student's padded-PDN grid must equal layer2's grid (backbone_size / 8)."""
  student = pdn_output_size((cfg.image_size,), cfg.size, padded=True)[0]
  if cfg.backbone_size % 16 or student != cfg.backbone_size // 8:
    raise ValueError(f"padded PDN-{cfg.size} on {cfg.image_size}^2 gives {student}^2, but layer2 of the "
                     f"{cfg.backbone_size}^2 backbone input is {cfg.backbone_size / 8:g}^2 (and backbone_size "
                     "must be a multiple of 16): use backbone_size = 2 * image_size")


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
  """Adam with coupled L2 decay and no schedule: the training optimizer with the decay factor 1."""
  optim = OptimConfig(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, decay_factor=1.0)
  return train_step.make_optimizer(optim, cfg.steps)


def distill_step(student: PDN, backbone: wide_resnet.WideResNet, cfg: DistillConfig,
                 tx: optax.GradientTransformation, state: TrainState, backbone_vars: dict, stats: TeacherStats,
                 batch: dict[str, jnp.ndarray]) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One update: L = mean((S(image) - (target(backbone) - mean) / std)^2). Only the student is differentiated."""
  target = normalization.normalize_teacher(target_features(backbone, cfg, backbone_vars, batch["backbone"]),
                                           stats)
  target = jax.lax.stop_gradient(target)
  loss_fn = lambda p: mse(student.apply({"params": p}, batch["image"]).astype(jnp.float32), target)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}


def _shardings(mesh: jax.sharding.Mesh):
  spec = jax.sharding.PartitionSpec
  return jax.sharding.NamedSharding(mesh, spec()), jax.sharding.NamedSharding(mesh, spec("data"))


def compile_distill_step(student: PDN, backbone: wide_resnet.WideResNet, cfg: DistillConfig,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> Callable:
  """`distill_step` jitted data-parallel (batch on 'data', the rest replicated, state donated).

  Returns fn(state, backbone_vars, stats, batch) -> (state, {'loss'}).
  """
  replicated, sharded = _shardings(mesh)
  return backend.jit(functools.partial(distill_step, student, backbone, cfg, tx),
                     in_shardings=(replicated, replicated, replicated, sharded),
                     out_shardings=(replicated, replicated), donate_argnums=0)


def fit_target_stats(backbone: wide_resnet.WideResNet, cfg: DistillConfig, backbone_vars: dict,
                     batches: Callable, mesh: jax.sharding.Mesh) -> TeacherStats:
  """Per-channel mean / std of the target over the stats images (the teacher-statistics rule of docs/method.md §5.1);
  a constant channel gets std 1.

  batches: callable returning a fresh iterable of this process's {'backbone': ...} batches (called twice).
  """
  replicated, sharded = _shardings(mesh)
  fn = backend.jit(functools.partial(target_features, backbone, cfg), in_shardings=(replicated, sharded),
                   out_shardings=sharded)

  def features(batch):
    images = train_step.shard_batch({"backbone": batch["backbone"]}, mesh)["backbone"]
    return np.asarray(multihost_utils.process_allgather(fn(backbone_vars, images), tiled=True))

  stats = normalization.fit_teacher_stats(features, batches)
  # A constant target channel (dead ReLUs under a pooling bin: seen with random backbones) has std 0 and would
  # make every loss NaN; dividing by 1 instead keeps it a constant 0 target.
  std = np.asarray(stats.std)
  flat = std <= 1e-6 * np.median(std)
  if flat.any():
    log.warning("%d of %d target channels are constant over the stats images; their std is set to 1",
                int(flat.sum()), std.size)
  return TeacherStats(mean=stats.mean, std=jnp.asarray(np.where(flat, 1.0, std), jnp.float32))


def distill(cfg: DistillConfig, workdir: str | pathlib.Path, *, progress: bool = True
            ) -> tuple[pathlib.Path, list[tuple[int, float]]]:
  """Distils the teacher, resuming from RUN/checkpoints; returns (RUN/teacher, [(step, loss)] logged here)."""
  workdir = pathlib.Path(workdir).absolute()
  check_sizes(cfg)
  trainer.write_config(workdir, cfg)  # a restart with other settings is refused

  # --- Networks, frozen backbone, data, mesh.
  student = PDN(cfg.size, cfg.channels, padded=True)
  backbone = wide_resnet.from_config(cfg)
  mesh = train_step.data_mesh()
  local_batch = distill_data.local_batch_size(cfg.batch_size, jax.process_count(), jax.device_count())
  source = distill_data.image_source(cfg.imagenet, cfg.tfds_data_dir)
  it = iter(distill_data.train_dataset(source, cfg, local_batch, jax.process_index(), jax.process_count()))
  tx = make_optimizer(cfg)
  step_fn = compile_distill_step(student, backbone, cfg, tx, mesh)

  # --- Fresh start (statistics first) or resume from the last complete checkpoint.
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", cfg.max_to_keep)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  params = student.init(jax.random.key(cfg.seed), x)["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  stats = TeacherStats(jnp.zeros(cfg.channels), jnp.ones(cfg.channels))
  backbone_vars = wide_resnet.load_backbone(cfg.backbone_weights, backbone)
  state, stats, backbone_vars = train_step.replicate((state, stats, backbone_vars), mesh)
  start = ckpts.latest_step()
  if start is not None:
    state, stats, data_state = ckpts.restore(start, state, stats)
    it.set_state(data_state)
    log.info("resumed from %s at step %d", workdir / "checkpoints", start)
  else:
    stats_ds = distill_data.stats_dataset(source, cfg, local_batch, jax.process_index(), jax.process_count())
    log.info("fitting target statistics on %d images", len(stats_ds) * local_batch * jax.process_count())
    stats = fit_target_stats(backbone, cfg, backbone_vars, lambda: iter(stats_ds), mesh)
    stats = train_step.replicate(stats, mesh)
    start = 0

  # --- The training loop (same structure as trainer.train).
  history = []
  writer = trainer.log_writer(workdir) if jax.process_index() == 0 else None
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not progress or jax.process_index() != 0,
                  unit="step", dynamic_ncols=True)
  try:
    for step in range(start, cfg.steps):
      state, losses = step_fn(state, backbone_vars, stats, train_step.shard_batch(next(it), mesh))
      done = step + 1
      if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps:
        values = {k: float(v) for k, v in losses.items()}
        trainer.check_finite(values, done)  # before saving: keep the last good checkpoint
        history.append((done, values["loss"]))
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
        if writer is not None:
          writer.add_scalar("distill/loss", values["loss"], done)
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        ckpts.save(done, state, stats, it.get_state())
      bar.update(1)
  finally:  # also on divergence or Ctrl-C: the last good checkpoint's async save must complete
    bar.close()
    ckpts.wait()
    ckpts.close()
  if writer is not None:
    writer.close()

  # --- The teacher: same names and shapes in the unpadded PDN that training uses.
  path = workdir / "teacher"
  source_text = (f"distilled from {cfg.backbone_weights} on {cfg.imagenet}, {cfg.steps} steps of "
                 f"{cfg.batch_size} (efficientad_jax.distill)")
  host_params = jax.tree_util.tree_map(np.asarray, state.params)  # replicated: every process holds it all
  weights.save_teacher(path, host_params, cfg.size, source_text, layout="distilled", force=True)
  log.info("saved the distilled PDN-%s teacher to %s", cfg.size, path)
  return path, history
