"""The training run (impure orchestration, SPEC sections 3-4): statistics -> steps -> calibration -> model.

Reads top to bottom: `train(cfg, workdir)` sets up the run, fits or restores the teacher statistics, runs the
jitted data-parallel step with periodic orbax checkpoints (resumable at any moment), calibrates the map
quantiles and the decision threshold on validation normals, and writes the complete model to RUN/model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from efficientad_jax import backend, checkpoint, models, normalization, train_step, weights
from efficientad_jax import config as config_lib
from efficientad_jax.config import Config
from efficientad_jax.data import Datasets, eval_batches, make_datasets
from efficientad_jax.inference import Detector, make_predict_fn, make_raw_maps_fn

log = logging.getLogger("efficientad_jax")


class TrainingDiverged(RuntimeError):
  """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_paths(cfg: Config, workdir: pathlib.Path) -> Config:
  """The synthetic dataset without a root is generated inside the run (RUN/data), never in a shared folder
  that another run with other synthetic settings could regenerate under it."""
  if cfg.data.dataset == "synthetic" and not cfg.data.root:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(workdir / "data")))
  return cfg


def write_config(workdir: pathlib.Path, cfg: Config) -> None:
  """RUN/config.json; a restart with a different config is refused (it would not resume the same run)."""
  path = workdir / "config.json"
  text = config_lib.to_json(cfg)
  if path.exists() and path.read_text() != text:
    raise ValueError(f"{path} holds a different config: resume with the same settings, or use a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def load_teacher(cfg: Config, nets: models.Models, key: jax.Array) -> tuple[dict, str]:
  """The frozen teacher: an imported/distilled checkpoint, or (demo only) random weights, said loudly."""
  if cfg.train.teacher_checkpoint:
    params, size = weights.load_teacher(cfg.train.teacher_checkpoint)
    if size != cfg.model.size:
      raise ValueError(f"teacher checkpoint {cfg.train.teacher_checkpoint} is PDN-{size}, "
                       f"but model.size is {cfg.model.size!r}")
    return params, str(cfg.train.teacher_checkpoint)
  log.warning("no train.teacher_checkpoint: using a RANDOM teacher (fine for the demo, not for real results; "
              "import one with `python -m experiments.import_teacher`)")
  x = jnp.zeros((1, cfg.model.image_size, cfg.model.image_size, 3))
  return nets.teacher.init(key, x)["params"], "random"


def image_batches(records: Any, batch_size: int) -> Iterable[np.ndarray]:
  """Normalised images of an ordered eval dataset, in fixed-size batches (the last one padded by repetition,
  so every batch has one shape and jit compiles once); yields (images [B, S, S, 3], number of real images)."""
  for batch in eval_batches(records, batch_size):
    images = batch["image"]
    n = len(images)
    if n < batch_size:
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    yield images, n


def fit_teacher_stats(nets: models.Models, teacher: dict, ds: Datasets, batch_size: int
                      ) -> normalization.TeacherStats:
  """Channel statistics of the teacher over the (un-augmented) training images (SPEC 3)."""
  apply = backend.jit(lambda p, x: nets.teacher.apply({"params": p}, x))

  def features(batch):
    images, n = batch
    return np.asarray(apply(teacher, images))[:n]  # drop the padding images of the last batch

  return normalization.fit_teacher_stats(features, lambda: image_batches(ds.train_eval, batch_size))


def calibrate(cfg: Config, nets: models.Models, params: dict, stats: normalization.TeacherStats,
              ds: Datasets, batch_size: int) -> tuple[normalization.MapQuantiles, float]:
  """Map quantiles from validation normals, then the decision threshold: the `threshold_quantile` of the
  validation images' scores under the calibrated model (SPEC 4; test images are never used)."""
  raw = make_raw_maps_fn(nets)
  st, ae = [], []
  for images, n in image_batches(ds.validation, batch_size):
    m_st, m_ae = raw(params, stats, images)
    st.append(np.asarray(m_st)[:n])
    ae.append(np.asarray(m_ae)[:n])
  quantiles = normalization.fit_map_quantiles(np.concatenate(st), np.concatenate(ae), cfg.maps.q_start,
                                              cfg.maps.q_end)
  detector = Detector(params=params, teacher_stats=stats, quantiles=quantiles)
  predict = make_predict_fn(nets, cfg.maps)
  scores = []
  for batch in eval_batches(ds.validation, 1):
    out = predict(detector, batch["image"], out_size=tuple(int(v) for v in batch["orig_size"][0]))
    scores.append(float(out["score"][0]))
  return quantiles, float(np.quantile(scores, cfg.maps.threshold_quantile))


def check_finite(losses: dict[str, float], step: int) -> None:
  bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
  if bad:
    raise TrainingDiverged(f"step {step}: non-finite loss {bad}; stopped, the last checkpoint is kept "
                           "(lower optim.learning_rate or check the input images)")


def log_writer(workdir: pathlib.Path):
  try:
    from tensorboardX import SummaryWriter  # optional: plain training needs no TensorBoard
  except ImportError:
    log.warning("tensorboardX is not installed: no TensorBoard scalars")
    return None
  return SummaryWriter(str(workdir / "tensorboard"))


def train(cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Trains, calibrates and saves the complete model; returns RUN/model. Resumes from RUN/checkpoints."""
  workdir = pathlib.Path(workdir).absolute()
  cfg = resolve_paths(cfg, workdir)
  write_config(workdir, cfg)
  key = jax.random.key(cfg.train.seed)
  init_key, teacher_key, step_key = jax.random.split(key, 3)

  # --- Data, networks, mesh.
  ds = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed)
  nets = models.build(cfg.model)
  mesh = train_step.data_mesh()
  local_batch = cfg.train.batch_per_device * jax.local_device_count()
  it = ds.train_iter(local_batch, jax.process_index(), jax.process_count())
  if not ds.info["penalty"]:
    log.warning("no data.penalty source: training WITHOUT the ImageNet penalty (recorded in the model as "
                "'penalty: off'); pass data.penalty=<image folder> or tfds:imagenette")
  tx = train_step.make_optimizer(cfg.optim, cfg.train.steps)
  step_fn = train_step.compile_train_step(nets, cfg, tx, mesh)

  # --- Fresh start or resume from the last complete checkpoint.
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", cfg.train.max_to_keep)
  teacher, teacher_source = load_teacher(cfg, nets, teacher_key)
  params = models.init_params(nets, init_key, cfg.model.image_size)
  state = train_step.init_state(params, tx)
  c = cfg.model.teacher_channels
  frozen = train_step.Frozen(teacher=teacher, stats=normalization.TeacherStats(jnp.zeros(c), jnp.ones(c)))
  state, frozen = train_step.replicate((state, frozen), mesh)
  start = ckpts.latest_step()
  if start is not None:
    state, frozen, data_state = ckpts.restore(start, state, frozen)
    it.set_state(data_state)
    log.info("resumed from %s at step %d", workdir / "checkpoints", start)
  else:
    log.info("fitting teacher statistics on %d training images", len(ds.train_eval))
    stats = fit_teacher_stats(nets, teacher, ds, local_batch)
    frozen = train_step.replicate(train_step.Frozen(teacher=teacher, stats=stats), mesh)
    start = 0

  # --- The training loop.
  writer = log_writer(workdir) if jax.process_index() == 0 else None
  bar = tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not progress or jax.process_index() != 0,
                  unit="step", dynamic_ncols=True)
  try:
    for step in range(start, cfg.train.steps):
      batch = train_step.shard_batch(next(it), mesh)
      state, losses = step_fn(state, frozen, batch, step_key)
      done = step + 1
      if done % cfg.train.log_every == 0 or done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
        values = {k: float(v) for k, v in losses.items()}
        check_finite(values, done)  # before saving: a diverged state never overwrites a good checkpoint
        bar.set_postfix({k.replace("loss_", ""): f"{v:.4f}" for k, v in values.items()}, refresh=False)
        if writer is not None:
          for k, v in values.items():
            writer.add_scalar(f"train/{k}", v, done)
      if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
        # The iterator state is the number of batches consumed, equal on every process, so the primary host's
        # copy (the one orbax writes) resumes all of them.
        ckpts.save(done, state, frozen, it.get_state())
      bar.update(1)
  finally:  # also on divergence or Ctrl-C: the last good checkpoint's async save must complete
    bar.close()
    ckpts.wait()
    ckpts.close()

  # --- Calibration on validation normals, then the complete model.
  params = {"teacher": frozen.teacher, **state.params}
  quantiles, threshold = calibrate(cfg, nets, params, frozen.stats, ds, local_batch)
  detector = Detector(params=params, teacher_stats=frozen.stats, quantiles=quantiles)
  meta = {"config": config_lib.to_dict(cfg), "model_size": cfg.model.size, "image_size": cfg.model.image_size,
          "teacher": teacher_source, "penalty": "on" if ds.info["penalty"] else "off", "threshold": threshold,
          "threshold_rule": f"{cfg.maps.threshold_quantile} quantile of validation image scores",
          "steps": cfg.train.steps, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  path = workdir / "model"
  checkpoint.save_model(path, detector, meta)  # every process calls it: orbax syncs them, the primary writes
  if writer is not None:
    writer.close()
  log.info("saved the model to %s (threshold %.4f)", path, threshold)
  return path
