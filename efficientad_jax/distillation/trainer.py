"""Teacher distillation's run on the shared engine (docs/method.md §8): target statistics, the steps, the teacher.

The backbone is loaded from its `.pth` and passed to every step as a frozen argument, never checkpointed.
`distill(cfg, workdir)` runs resumably and writes RUN/teacher for `files.weights.load_teacher`. The target and
the step are `distillation.train_step`.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from efficientad_jax.config import ImageSize
from efficientad_jax.distillation import stream
from efficientad_jax.distillation.config import DistillConfig
from efficientad_jax.distillation.train_step import check_sizes, compile_distill_step, target_features
from efficientad_jax.efficientad import normalization
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.models import PDN, init_network, weights, wide_resnet
from efficientad_jax.training import engine, optim, parallel
from efficientad_jax.training.optim import TrainState

log = logging.getLogger("efficientad_jax")


def fit_target_stats(
  backbone: wide_resnet.WideResNet, cfg: DistillConfig, backbone_vars: dict, batches: Callable, mesh: jax.sharding.Mesh
) -> TeacherStats:
  """Per-channel mean / std of the target over the stats images (the teacher-statistics rule of docs/method.md §5.1);
  a constant channel gets std 1.

  batches: callable returning a fresh iterable of this process's {'backbone': ...} batches (called twice).
  """
  fn = parallel.compile_step(functools.partial(target_features, backbone, cfg), mesh, "rd", "d")

  def features(batch):
    images = parallel.shard_batch({"backbone": batch["backbone"]}, mesh)["backbone"]
    return np.asarray(multihost_utils.process_allgather(fn(backbone_vars, images), tiled=True))

  stats = normalization.fit_teacher_stats(features, batches)
  # A constant target channel (dead ReLUs under a pooling bin: seen with random backbones) has std 0 and would
  # make every loss NaN; dividing by 1 instead keeps it a constant 0 target.
  std = np.asarray(stats.std)
  flat = std <= 1e-6 * np.median(std)
  if flat.any():
    log.warning(
      "%d of %d target channels are constant over the stats images; their std is set to 1", int(flat.sum()), std.size
    )
  return TeacherStats(mean=stats.mean, std=jnp.asarray(np.where(flat, 1.0, std), jnp.float32))


def distill(
  cfg: DistillConfig, workdir: str | pathlib.Path, *, progress: bool = True
) -> tuple[pathlib.Path, list[tuple[int, float]]]:
  """Distils the teacher, resuming from RUN/checkpoints; returns (RUN/teacher, [(step, loss)] logged here)."""
  check_sizes(cfg)
  with engine.run_directory(cfg, workdir, "teacher distillation") as run:
    return _distill(*run, progress=progress)


def _distill(
  saved_cfg: DistillConfig, cfg: DistillConfig, workdir: pathlib.Path, *, progress: bool
) -> tuple[pathlib.Path, list[tuple[int, float]]]:

  # --- Networks, frozen backbone, data, mesh.
  student = PDN(cfg.model.size, cfg.model.channels, padded=True)
  backbone = wide_resnet.from_config(cfg.backbone)
  mesh = parallel.data_mesh()
  local_batch = stream.local_batch_size(cfg.train.batch_size, jax.process_count(), jax.device_count())
  source = stream.image_source(cfg.data.imagenet, cfg.data.tfds_data_dir)
  backbone_vars = parallel.replicate(wide_resnet.load_backbone(cfg.backbone.weights, backbone), mesh)
  engine.write_config(workdir, saved_cfg)  # a restart with other settings is refused
  it = iter(stream.train_dataset(source, cfg, local_batch, jax.process_index(), jax.process_count()))
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  step_fn = compile_distill_step(student, backbone, cfg, tx, mesh)
  size = ImageSize(cfg.model.image_size)
  init = lambda key: TrainState.create(init_network(student, key, size), tx)
  key = jax.random.key(cfg.train.seed)

  # --- The steps on the engine; the frozen part is the target statistics (the backbone is loaded, never
  # checkpointed), fitted on a fresh start.
  def fresh():
    stats_ds = stream.stats_dataset(source, cfg, local_batch, jax.process_index(), jax.process_count())
    log.info("fitting target statistics on %d images", len(stats_ds) * local_batch * jax.process_count())
    stats = fit_target_stats(backbone, cfg, backbone_vars, lambda: iter(stats_ds), mesh)
    return parallel.new_state(init, key, mesh), parallel.replicate(stats, mesh)

  def template():
    stats = TeacherStats.identity(cfg.model.channels)  # shapes only: the values come from the checkpoint
    return parallel.state_template(init, key, mesh), parallel.as_template(stats, mesh)

  def advance(state, stats, step, count):
    del step, count  # one step per call (Stage.per_dispatch = 1); the iterator holds the position
    return step_fn(state, backbone_vars, stats, parallel.shard_batch(next(it), mesh))

  stage = engine.Stage.of_schedule(cfg.train)
  hooks = engine.Hooks(fresh=fresh, template=template, progress=it.get_state, resume=it.set_state)
  with engine.log_writer(workdir) as writer:
    state, _, history = engine.run_stage(stage, workdir, advance, hooks, writer=writer, show_progress=progress)

  # --- The teacher: same names and shapes in the unpadded PDN that training uses.
  path = workdir / "teacher"
  source_text = (
    f"distilled from {cfg.backbone.weights} on {cfg.data.imagenet}, {cfg.train.steps} steps of "
    f"{cfg.train.batch_size} (efficientad_jax.distillation.trainer)"
  )
  host_params = jax.tree_util.tree_map(np.asarray, state.params)  # replicated: every process holds it all
  weights.save_teacher(path, host_params, cfg.model.size, source_text, layout="distilled", force=True)
  log.info("saved the distilled PDN-%s teacher to %s", cfg.model.size, path)
  return path, [(step, values["loss"]) for step, values in history]
