"""EfficientAD's training run on the engine (docs/method.md §5-§7): statistics -> steps -> calibration -> model.

Reads top to bottom: `train(cfg, workdir)` checks the config, data, teacher and disk before the run directory
records anything; `pieces` builds the method's parts the engine runs (networks, optimizer, jitted
data-parallel step, state factory); the engine (`engine.run_stage`) fits the teacher statistics on a fresh
start or restores the last checkpoint, and runs the steps with periodic orbax checkpoints (resumable at any
moment); `inference.calibrate` fits the map quantiles and the decision threshold on validation
normals; the complete model goes to RUN/model. `prepare_run`, `fresh_start` and `save_model` are the pieces of
one run that the members trainer (`members_trainer.py`, many runs in one program) reuses as they are.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficientad_jax import config as config_lib
from efficientad_jax import models, tiles
from efficientad_jax.config import Config
from efficientad_jax.data import Datasets, make_datasets
from efficientad_jax.data.api import check_images
from efficientad_jax.data.batches import map_batches, ordered_batches
from efficientad_jax.data.records import DataError
from efficientad_jax.efficientad import inference, normalization, train_step
from efficientad_jax.models import weights
from efficientad_jax.serving import saved_model
from efficientad_jax.training import (
  checkpoint,
  compiler,
  engine,
  optim,
  parallel,
)

log = logging.getLogger("efficientad_jax")


class Pieces(NamedTuple):
  """What the engine runs for EfficientAD (also what the benchmark and the tests time and check)."""

  nets: models.Models
  tx: optax.GradientTransformation
  step: Callable  # jitted fn(state, frozen, sharded batch, key) -> (state, losses); state donated
  # the same for K stacked batches [K, B, ...] ('s' sharding): K steps in one call (train.steps_per_dispatch)
  steps: Callable
  init: Callable[[jax.Array], train_step.TrainState]  # key -> fresh state (placed by parallel.new_state)


def pieces(cfg: Config, mesh: jax.sharding.Mesh) -> Pieces:
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = lambda key: train_step.init_state(models.init_params(nets, key, cfg.model.network_size), tx)
  return Pieces(
    nets,
    tx,
    train_step.compile_train_step(nets, cfg, tx, mesh),
    train_step.compile_train_steps(nets, cfg, tx, mesh),
    init,
  )


def make_advance(method: Pieces, batches: Iterator[dict], mesh: jax.sharding.Mesh, key: jax.Array) -> engine.Advance:
  """The engine's `advance` for EfficientAD: one host batch from `batches` through `method.step`, or `count`
  of them stacked [count, B, ...] through `method.steps` (K steps in one call), copied to the devices (sharded
  on 'data'). The call returns before the device finishes, so the next call's batches are read and copied
  while this one runs."""

  def advance(state, frozen, first, count):
    del first  # the iterator holds the position; every step folds its own number into `key`
    if count == 1:
      return method.step(state, frozen, parallel.shard_batch(next(batches), mesh), key)
    stacked = parallel.stack_batches([next(batches) for _ in range(count)])
    return method.steps(state, frozen, parallel.shard_batch(stacked, mesh, "s"), key)

  return advance


def frozen_template(teacher: dict, channels: int, mesh: jax.sharding.Mesh) -> train_step.Frozen:
  """The shapes and shardings a checkpoint's frozen part restores into (the statistics are in the checkpoint)."""
  stats = normalization.TeacherStats.identity(channels)  # shapes only: the values come from the checkpoint
  return parallel.as_template(train_step.Frozen(teacher=teacher, stats=stats), mesh)


def write_splits(workdir: pathlib.Path, ds: Datasets, cfg: Config) -> None:
  """RUN/splits.json: the training and the held-out validation images (file paths or 'tfds:<id>'), so the
  split of a run can be audited (primary process only; the split is a function of the config)."""
  if jax.process_index() != 0:
    return
  listing = ds.listing()
  doc = {
    "dataset": ds.info.dataset,
    "category": ds.info.category,
    "seed": cfg.train.seed,
    "validation_fraction": cfg.data.validation_fraction,
    "num_train": len(listing["train"]),
    "num_validation": len(listing["validation"]),
    **listing,
  }
  (workdir / "splits.json").write_text(json.dumps(doc, indent=1))


def load_teacher(cfg: Config, nets: models.Models, key: jax.Array) -> tuple[dict, str]:
  """The frozen teacher: an imported/distilled checkpoint, or (demo only) random weights, said loudly."""
  if cfg.train.teacher_checkpoint:
    params, size = weights.load_teacher(cfg.train.teacher_checkpoint)
    if size != cfg.model.size:
      raise ValueError(
        f"teacher checkpoint {cfg.train.teacher_checkpoint} is PDN-{size}, but model.size is {cfg.model.size!r}"
      )
    return params, str(cfg.train.teacher_checkpoint)
  log.warning(
    "no train.teacher_checkpoint: using a RANDOM teacher (fine for the demo, not for real results; "
    "import one with `python -m experiments.import_teacher`)"
  )
  x = jnp.zeros((1, *cfg.model.network_size, 3))
  return nets.teacher.init(key, x)["params"], "random"


@functools.lru_cache(maxsize=8)
def teacher_features_fn(nets: models.Models, tiling: tiles.Tiling | None) -> Callable:
  """The jitted teacher features per image, fn(teacher params, images) -> [B, h, w, C]; one per (networks, tiles),
  so the runs of one process (a group's members, a test's runs) compile it once."""
  teacher_of = lambda p, x: nets.teacher.apply({"params": p}, inference.network_input(x, tiling))
  return compiler.jit(lambda p, x: inference.per_image(teacher_of(p, x), x.shape[0]))  # padded batches: per image


def fit_teacher_stats(
  nets: models.Models, teacher: dict, ds: Datasets, batch_size: int, tiling: tiles.Tiling | None = None
) -> normalization.TeacherStats:
  """Channel statistics of the teacher over the (un-augmented) training images (docs/method.md §5.1); with
  tiles, over every tile of them (what the networks see)."""
  apply = teacher_features_fn(nets, tiling)
  run = lambda images, _: apply(teacher, images)
  features = lambda: (out for _, out in map_batches(run, ordered_batches(ds.train_eval, batch_size)))
  return normalization.fit_teacher_stats(lambda t: t, features)


def checked_datasets(cfg: Config) -> Datasets:
  """`make_datasets` for training (every training image decoded once, into the decode cache, unless
  data.decode_cache is off), then the checks that would otherwise fail only after training: a validation split
  to calibrate on, and every training and validation image decodable (a corrupt file fails in seconds)."""
  ds = make_datasets(
    cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed, training=True, tiling=tiles.from_model(cfg.model)
  )
  if not ds.info.num_validation:
    raise DataError(
      f"{ds.info.root}: no validation images (data.validation_fraction="
      f"{cfg.data.validation_fraction}, {ds.info.num_train} training images): calibration needs "
      "at least one; add training images or raise data.validation_fraction (LOCO: validation/good)"
    )
  listing = ds.listing()
  check_images(listing["validation"] if ds.info.decoded_once else listing["train"] + listing["validation"])
  return ds


class Prepared(NamedTuple):
  """One run directory, checked and recorded (`prepare_run`): what its training and its saved model read."""

  saved_cfg: Config  # as given: what RUN/config.json and the model keep
  cfg: Config  # as run (generated paths resolved)
  workdir: pathlib.Path
  ds: Datasets
  teacher: dict
  teacher_source: str  # the checkpoint's path, or "random"
  init_key: jax.Array  # the networks' initialisation
  step_key: jax.Array  # the base key every step folds its number into (dropout)
  state_like: train_step.TrainState  # shapes and shardings a checkpoint restores into


def prepare_run(
  saved_cfg: Config, cfg: Config, workdir: pathlib.Path, method: Pieces, mesh: jax.sharding.Mesh
) -> Prepared:
  """Data, teacher and disk checked, then RUN/config.json and RUN/splits.json written: nothing is recorded in
  the run directory before every check has passed. The keys are split from train.seed."""
  init_key, teacher_key, step_key = jax.random.split(jax.random.key(cfg.train.seed), 3)
  ds = checked_datasets(cfg)
  teacher, teacher_source = load_teacher(cfg, method.nets, teacher_key)
  state_like = parallel.state_template(method.init, init_key, mesh)
  checkpoint.check_space(workdir, 2 * checkpoint.tree_bytes(state_like, teacher))  # before any step
  engine.write_config(workdir, saved_cfg)
  write_splits(workdir, ds, cfg)
  if not ds.info.penalty:
    log.warning(
      "no data.penalty source: training WITHOUT the ImageNet penalty (recorded in the model as "
      "'penalty: off'); pass data.penalty=<image folder> or tfds:imagenette"
    )
  return Prepared(saved_cfg, cfg, workdir, ds, teacher, teacher_source, init_key, step_key, state_like)


def fresh_start(
  run: Prepared, method: Pieces, mesh: jax.sharding.Mesh, local_batch: int
) -> tuple[train_step.TrainState, train_step.Frozen]:
  """A run without checkpoints: the teacher statistics fitted on its training images, fresh networks."""
  log.info("fitting teacher statistics on %d training images", len(run.ds.train_eval))
  stats = fit_teacher_stats(method.nets, run.teacher, run.ds, local_batch, tiles.from_model(run.cfg.model))
  frozen = parallel.replicate(train_step.Frozen(teacher=run.teacher, stats=stats), mesh)
  return parallel.new_state(method.init, run.init_key, mesh), frozen


def save_model(
  run: Prepared, state: train_step.TrainState, frozen: train_step.Frozen, local_batch: int
) -> pathlib.Path:
  """Calibration on the validation normals, then the complete model in RUN/model (every process: the primary
  writes)."""
  cfg = run.cfg
  detector, threshold, validation_scores = inference.calibrate(
    cfg, {"teacher": frozen.teacher, **state.params}, frozen.stats, run.ds.validation, local_batch
  )
  meta = {
    "config": config_lib.to_dict(run.saved_cfg),
    "model_size": cfg.model.size,
    "image_size": cfg.model.image_size,
    "teacher": run.teacher_source,
    "penalty": "on" if run.ds.info.penalty else "off",
    "threshold": threshold,
    "threshold_rule": f"{cfg.maps.threshold_quantile} quantile of validation image scores",
    "validation_scores": validation_scores,  # for other thresholds later (serving.thresholds)
    "steps": cfg.train.steps,
    "global_batch": cfg.train.batch_size,
    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  path = saved_model.save(run.workdir / "model", "efficientad", detector, meta)
  log.info("saved the model to %s (threshold %.4f)", path, threshold)
  return path


def train(cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Trains, calibrates and saves the complete model; returns RUN/model. Resumes from RUN/checkpoints."""
  with engine.run_directory(cfg, workdir, "training") as run:
    return _train(*run, progress=progress)


def _train(saved_cfg: Config, cfg: Config, workdir: pathlib.Path, *, progress: bool) -> pathlib.Path:
  # --- Data, networks, teacher, mesh, disk: all checked before the run directory records anything.
  devices = parallel.data_parallel_devices(cfg.train.batch_size)
  mesh = parallel.data_mesh(devices)
  method = pieces(cfg, mesh)
  run = prepare_run(saved_cfg, cfg, workdir, method, mesh)
  local_batch = cfg.train.batch_size // jax.process_count()  # this process's share
  log.info(
    "global batch %d on %d of %d devices: %d image(s) per device",
    cfg.train.batch_size,
    len(devices),
    jax.device_count(),
    cfg.train.batch_size // len(devices),
  )
  it = run.ds.train_iter(local_batch, jax.process_index(), jax.process_count())

  # --- The steps, on the engine: a fresh start fits the teacher statistics first.
  # The iterator state is the number of batches consumed, equal on every process, so the primary host's copy
  # (the one orbax writes) resumes all of them.
  if cfg.train.steps_per_dispatch > 1 and jax.default_backend() == "cpu":
    log.warning(
      "train.steps_per_dispatch=%d on a CPU: XLA:CPU runs the K-step loop far slower than single "
      "steps (BUILD_NOTES.md, 'Training feed'); K > 1 pays off on accelerators",
      cfg.train.steps_per_dispatch,
    )
  advance = make_advance(method, it, mesh, run.step_key)
  hooks = engine.Hooks(
    fresh=lambda: fresh_start(run, method, mesh, local_batch),
    template=lambda: (run.state_like, frozen_template(run.teacher, cfg.model.teacher_channels, mesh)),
    progress=it.get_state,
    resume=it.set_state,
  )
  stage = engine.Stage.of_schedule(cfg.train, per_dispatch=cfg.train.steps_per_dispatch)
  try:
    with engine.log_writer(workdir) as writer:
      state, frozen, _ = engine.run_stage(stage, workdir, advance, hooks, writer=writer, show_progress=progress)
  finally:  # stops grain's worker processes now: left to exit, they leak their shared memory (and say so)
    it.close()

  # --- Calibration on validation normals, then the complete model.
  return save_model(run, state, frozen, local_batch)
