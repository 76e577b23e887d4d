"""The training run (impure orchestration, docs/method.md §5-§7): statistics -> steps -> calibration -> model.

Reads top to bottom: `train(cfg, workdir)` sets up the run, fits or restores the teacher statistics, runs the
jitted data-parallel step with periodic orbax checkpoints (resumable at any moment), calibrates the map
quantiles and the decision threshold on validation normals, and writes the complete model to RUN/model.
"""

from __future__ import annotations

import dataclasses
import json
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
from efficientad_jax.data.api import check_images
from efficientad_jax.data.records import DataError
from efficientad_jax.inference import Detector, make_predict_fn, make_raw_maps_fn

log = logging.getLogger("efficientad_jax")


class TrainingDiverged(RuntimeError):
  """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_paths(cfg: Config, workdir: pathlib.Path) -> Config:
  """The synthetic dataset without a root is generated inside the run (RUN/data), never in a shared folder
  that another run with other synthetic settings could regenerate under it. Only the running config holds
  that absolute path: RUN/config.json and the model keep data.root empty, so a copied run still works."""
  if cfg.data.dataset == "synthetic" and not cfg.data.root:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(pathlib.Path(workdir) / "data")))
  return cfg


def has_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether the run has a complete checkpoint (RUN/checkpoints/<step>, or <stage>/<step> for AST)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  return any(p.is_dir() and p.name.isdigit() for p in [*folder.glob("*"), *folder.glob("*/*")])


def config_changes(workdir: pathlib.Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
  """{'section.field': (saved, new)} between RUN/config.json and `cfg`; raises ConfigError naming the fields
  when the run has a checkpoint and one of them is not in `config.RESUMABLE` (BUILD_NOTES.md, issue 18)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  changed = config_lib.changed_fields(json.loads(path.read_text()), json.loads(config_lib.to_json(cfg)))
  fixed = sorted(set(changed) - config_lib.RESUMABLE) if changed and has_checkpoint(workdir) else []
  if fixed:
    diff = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed)
    raise config_lib.ConfigError(
        f"{path} holds a different config ({diff}) and the run has checkpoints: resume with the saved "
        f"values, or use a new --workdir (a resumed run may change only {', '.join(sorted(config_lib.RESUMABLE))})")
  return changed


def write_config(workdir: pathlib.Path, cfg: Any) -> None:
  """RUN/config.json. Until the run's first checkpoint exists, a corrected config simply replaces it; after,
  only the fields in `config.RESUMABLE` may change (`config_changes`). Every change is appended to
  RUN/config_history.jsonl."""
  changed = config_changes(workdir, cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  if changed:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpointed": has_checkpoint(workdir),
              "changed": {k: list(v) for k, v in changed.items()}}
    with open(workdir / "config_history.jsonl", "a") as f:
      f.write(json.dumps(record, default=str) + "\n")
    log.info("config of %s changed: %s", workdir, ", ".join(changed))
  (workdir / "config.json").write_text(config_lib.to_json(cfg))


def write_splits(workdir: pathlib.Path, ds: Datasets, cfg: Config) -> None:
  """RUN/splits.json: the training and the held-out validation images (file paths or 'tfds:<id>'), so the
  split of a run can be audited (primary process only; the split is a function of the config)."""
  if jax.process_index() != 0:
    return
  listing = ds.listing()
  doc = {"dataset": ds.info["dataset"], "category": ds.info["category"], "seed": cfg.train.seed,
         "validation_fraction": cfg.data.validation_fraction, "num_train": len(listing["train"]),
         "num_validation": len(listing["validation"]), **listing}
  (workdir / "splits.json").write_text(json.dumps(doc, indent=1))


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
  """Channel statistics of the teacher over the (un-augmented) training images (docs/method.md §5.1)."""
  apply = backend.jit(lambda p, x: nets.teacher.apply({"params": p}, x))

  def features(batch):
    images, n = batch
    return np.asarray(apply(teacher, images))[:n]  # drop the padding images of the last batch

  return normalization.fit_teacher_stats(features, lambda: image_batches(ds.train_eval, batch_size))


def calibrate(cfg: Config, nets: models.Models, params: dict, stats: normalization.TeacherStats,
              ds: Datasets, batch_size: int) -> tuple[normalization.MapQuantiles, float]:
  """Map quantiles from validation normals, then the decision threshold: the `threshold_quantile` of the
  validation images' scores under the calibrated model (docs/method.md §7.2, §7.4; test images are never used)."""
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
                           "(rerun the same command, same --workdir, with a lower --set optim.learning_rate=..., "
                           "or check the input images)")


def log_writer(workdir: pathlib.Path):
  try:
    from tensorboardX import SummaryWriter  # optional: plain training needs no TensorBoard
  except ImportError:
    log.warning("tensorboardX is not installed: no TensorBoard scalars")
    return None
  return SummaryWriter(str(workdir / "tensorboard"))


def checked_datasets(cfg: Config) -> Datasets:
  """`make_datasets`, then the checks that would otherwise fail only after training: a validation split to
  calibrate on, and every training and validation image decodable (a corrupt file fails in seconds)."""
  ds = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed)
  if not ds.info["num_validation"]:
    raise DataError(f"{ds.info['root']}: no validation images (data.validation_fraction="
                    f"{cfg.data.validation_fraction}, {ds.info['num_train']} training images): calibration needs "
                    "at least one; add training images or raise data.validation_fraction (LOCO: validation/good)")
  listing = ds.listing()
  check_images(listing["train"] + listing["validation"])
  return ds


def train(cfg: Config, workdir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Trains, calibrates and saves the complete model; returns RUN/model. Resumes from RUN/checkpoints."""
  workdir = pathlib.Path(workdir).absolute()
  saved_cfg = config_lib.validate(cfg)  # as given: RUN/config.json and the model hold no generated paths
  config_changes(workdir, saved_cfg)  # a refused resume fails now; the config is written once all is checked
  cfg = resolve_paths(cfg, workdir)
  key = jax.random.key(cfg.train.seed)
  init_key, teacher_key, step_key = jax.random.split(key, 3)

  # --- Data, networks, teacher, mesh: all checked before the run directory records anything.
  ds = checked_datasets(cfg)
  nets = models.build(cfg.model)
  teacher, teacher_source = load_teacher(cfg, nets, teacher_key)
  shapes = jax.eval_shape(lambda k: train_step.init_state(models.init_params(nets, k, cfg.model.image_size),
                                                          train_step.make_optimizer(cfg.optim, cfg.train.steps)),
                          init_key)
  checkpoint.check_space(workdir, 2 * checkpoint.tree_bytes(shapes, teacher))  # a full disk: before any step
  write_config(workdir, saved_cfg)
  devices = train_step.data_parallel_devices(cfg.train.batch_size)
  mesh = train_step.data_mesh(devices)
  local_batch = cfg.train.batch_size // jax.process_count()  # this process's share
  log.info("global batch %d on %d of %d devices: %d image(s) per device", cfg.train.batch_size, len(devices),
           jax.device_count(), cfg.train.batch_size // len(devices))
  write_splits(workdir, ds, cfg)
  it = ds.train_iter(local_batch, jax.process_index(), jax.process_count())
  if not ds.info["penalty"]:
    log.warning("no data.penalty source: training WITHOUT the ImageNet penalty (recorded in the model as "
                "'penalty: off'); pass data.penalty=<image folder> or tfds:imagenette")
  tx = train_step.make_optimizer(cfg.optim, cfg.train.steps)
  step_fn = train_step.compile_train_step(nets, cfg, tx, mesh)

  # --- Fresh start or resume from the last complete checkpoint.
  params = models.init_params(nets, init_key, cfg.model.image_size)
  state = train_step.init_state(params, tx)
  c = cfg.model.teacher_channels
  frozen = train_step.Frozen(teacher=teacher, stats=normalization.TeacherStats(jnp.zeros(c), jnp.ones(c)))
  state, frozen = train_step.replicate((state, frozen), mesh)
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", cfg.train.max_to_keep)
  bar = None
  try:  # from here on, every exit finishes orbax's background work (or a disk-full error is a traceback storm)
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
    if bar is not None:
      bar.close()
    ckpts.finish()

  # --- Calibration on validation normals, then the complete model.
  params = {"teacher": frozen.teacher, **state.params}
  quantiles, threshold = calibrate(cfg, nets, params, frozen.stats, ds, local_batch)
  detector = Detector(params=params, teacher_stats=frozen.stats, quantiles=quantiles)
  meta = {"config": config_lib.to_dict(saved_cfg), "model_size": cfg.model.size, "image_size": cfg.model.image_size,
          "teacher": teacher_source, "penalty": "on" if ds.info["penalty"] else "off", "threshold": threshold,
          "threshold_rule": f"{cfg.maps.threshold_quantile} quantile of validation image scores",
          "steps": cfg.train.steps, "global_batch": cfg.train.batch_size,
          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  path = workdir / "model"
  checkpoint.save_model(path, detector, meta)  # every process calls it: orbax syncs them, the primary writes
  if writer is not None:
    writer.close()
  log.info("saved the model to %s (threshold %.4f)", path, threshold)
  return path
