"""The EfficientAD-AST training run: features -> teacher flow -> student + autoencoder -> threshold -> model.

`train_ast(cfg, workdir)` runs on the same engine as EfficientAD (`engine.py`): RUN/config.json (a restart with
another config is refused), two resumable stages counted in epochs (RUN/checkpoints/flow/<epoch>,
RUN/checkpoints/student/<epoch>; each also holds the frozen networks and a small JSON state), NaN stop, TensorBoard,
and the complete model in RUN/model (`saved_model.save`, meta['method'] = 'efficientad_ast'). Both stages read
backbone features computed once per run from the un-augmented training images (`Datasets.train_eval`) and validation
normals; batches are drawn by a seeded per-epoch permutation. Foreground masks: the data pipeline provides none for
training images, so the flow NLL is a plain mean (`flow.nll_loss` takes a weight where one exists; BUILD_NOTES.md,
"Deviations from the reference"). Early stopping uses the validation-normal loss only. With `data.penalty` set,
every student step also sees the backbone features of a batch of penalty images (EfficientAD's ImageNet penalty,
`train_step.student_losses`); batch k of that stream is a pure function of (k, seed), so a resumed run sees the same
penalty images."""

from __future__ import annotations

import logging
import math
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efficientad_jax import config as config_lib
from efficientad_jax.data import batches, indexes, make_datasets, pipeline
from efficientad_jax.efficientad_ast import inference as method
from efficientad_jax.efficientad_ast import train_step
from efficientad_jax.efficientad_ast.config import AstConfig
from efficientad_jax.models import efficientnet
from efficientad_jax.serving import saved_model
from efficientad_jax.training import calibration, compiler, engine, optim, parallel

log = logging.getLogger("efficientad_jax")


def load_backbone(cfg: AstConfig, params: dict) -> tuple[dict, str]:
  """The frozen EfficientNet trunk: imported from torchvision's .pth, or (demo only) random, said loudly."""
  if cfg.backbone.weights:
    return efficientnet.load_torchvision(
      cfg.backbone.weights, cfg.backbone.width, cfg.backbone.depth, cfg.backbone.stages
    ), cfg.backbone.weights
  log.warning(
    "no backbone_weights: using a RANDOM EfficientNet trunk (fine for tests, not for results; pass "
    "a torchvision efficientnet_b5 state_dict .pth)"
  )
  return params, "random"


def extract(nets: method.Nets, backbone: dict, records, batch_size: int) -> np.ndarray:
  """Backbone features of eval records, in order: float32 [N, g, g, C] on the host."""
  fn = compiler.jit(lambda p, x: method.features(nets, p, x))
  run = lambda images, _: fn(backbone, images)
  out = [f for _, f in batches.map_batches(run, batches.ordered_batches(records, batch_size))]
  return np.concatenate(out) if out else np.zeros((0, nets.grid, nets.grid, nets.channels), np.float32)


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int):
  """Index arrays of one epoch: a seeded permutation, the incomplete last batch dropped (static shapes)."""
  order = np.random.default_rng([seed, stage, epoch]).permutation(n)
  for i in range(n // batch_size):
    yield order[i * batch_size : (i + 1) * batch_size]


def _local(x: np.ndarray) -> np.ndarray:
  """This process's share of a global batch (every process builds the same global batch)."""
  k = x.shape[0] // jax.process_count()
  return x[jax.process_index() * k : (jax.process_index() + 1) * k]


def _epoch_mean(losses: list[jax.Array]) -> jax.Array:
  return jnp.mean(jnp.stack(losses))  # on the device: the engine reads it at logged epochs only


def train_flow(
  cfg: AstConfig,
  nets: method.Nets,
  flow_params: dict,
  feats: np.ndarray,
  frozen: dict,
  workdir: pathlib.Path,
  mesh,
  progress: bool,
  writer=None,
) -> dict:
  """Stage 1: the teacher flow, `flow_epochs` epochs of NLL; resumable at checkpointed epochs."""
  t = cfg.train
  tx = optim.make_optimizer(cfg.optim, t.flow_epochs * (len(feats) // t.batch_size))
  step = parallel.compile_step(lambda s, b: train_step.flow_train_step(nets, tx, s, b), mesh, "rd", "rr", (0,))

  def advance(state, frozen, epoch, count):
    del count  # one epoch per call (Stage.per_dispatch = 1)
    losses = []
    for idx in epoch_batches(len(feats), t.batch_size, t.seed, 1, epoch):
      state, out = step(state, parallel.shard_batch({"features": _local(feats[idx])}, mesh))
      losses.append(out["loss"])
    return state, {"loss": _epoch_mean(losses)}

  fresh = lambda: parallel.replicate((optim.TrainState.create(flow_params, tx), frozen), mesh)
  stage = engine.Stage("flow", t.flow_epochs, 1, t.checkpoint_every, t.max_to_keep, unit="epoch")
  state, _, _ = engine.run_stage(
    stage, workdir, advance, engine.Hooks(fresh=fresh, template=fresh), writer=writer, show_progress=progress
  )
  return state.params


def penalty_features(cfg: AstConfig, nets: method.Nets, backbone: dict) -> Callable[[int], np.ndarray] | None:
  """fn(step) -> backbone features [B / P, g, g, C] of this process's penalty images for student step `step`;
  None when `data.penalty` is off (said loudly, as in EfficientAD)."""
  source = indexes.penalty_source(cfg.data.penalty, cfg.data.tfds_data_dir)
  if source is None:
    log.warning(
      "no data.penalty source: training the AST student WITHOUT the ImageNet penalty (recorded in the "
      "model as 'penalty: off')"
    )
    return None
  batches = pipeline.penalty_batches(
    source,
    image_size=cfg.model.image_size,
    batch_size=cfg.train.batch_size // jax.process_count(),
    seed=cfg.train.seed,
    data_cfg=cfg.data,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  fn = compiler.jit(lambda p, x: method.features(nets, p, x))
  return lambda step: np.asarray(fn(backbone, batches[step]))


def _validation_loss(eval_fn, state, val: dict[str, np.ndarray], batch_size: int, mesh) -> float:
  """Mean per-sample validation loss; the last chunk is padded by repetition and the padding ignored."""
  total, n = 0.0, len(val["features"])
  for i in range(0, n, batch_size):
    idx = np.arange(i, min(i + batch_size, n))
    pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    batch = parallel.shard_batch({k: _local(v[pad]) for k, v in val.items()}, mesh)
    total += float(np.sum(np.asarray(eval_fn(state, batch)["loss"])[: len(idx)]))
  return total / n


def train_student(
  cfg: AstConfig,
  nets: method.Nets,
  params: dict,
  train: dict,
  val: dict,
  frozen: dict,
  workdir: pathlib.Path,
  key: jax.Array,
  mesh,
  progress: bool,
  penalty: Callable[[int], np.ndarray] | None = None,
  writer=None,
) -> tuple[dict, dict]:
  """Stage 2: student + autoencoder, early stopping on the validation loss; returns (best params, summary).

  `penalty` (from `penalty_features`) gives the penalty features of each global student step, or None."""
  t = cfg.train
  steps_per_epoch = len(train["features"]) // t.batch_size
  tx = optim.make_optimizer(cfg.optim, t.student_epochs * steps_per_epoch)
  step = parallel.compile_step(
    lambda s, b, k: train_step.student_train_step(nets, tx, s, b, k), mesh, "rdr", "rr", (0,)
  )
  eval_fn = parallel.compile_step(lambda s, b: train_step.student_eval_losses(nets, s, b), mesh, "rd", "r")
  patience = max(1, int(t.patience_fraction * t.student_epochs))
  early = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}

  def advance(state, frozen, epoch, count):
    del count  # one epoch per call (Stage.per_dispatch = 1)
    losses = []
    for i, idx in enumerate(epoch_batches(len(train["features"]), t.batch_size, t.seed, 2, epoch)):
      local = {k: _local(v[idx]) for k, v in train.items()}
      if penalty is not None:
        local["penalty"] = penalty(epoch * steps_per_epoch + i)
      state, out = step(state, parallel.shard_batch(local, mesh), key)
      losses.append(out["loss"])
    val_loss = _validation_loss(eval_fn, state, val, t.batch_size, mesh)
    early["epoch"] = epoch + 1
    if val_loss < early["best_loss"]:
      state = train_step.keep_best(state)
      early.update(best_loss=float(val_loss), best_epoch=epoch + 1, bad_epochs=0)
    else:
      early["bad_epochs"] += 1
      early["stopped"] = early["bad_epochs"] >= patience
    return state, {"loss": _epoch_mean(losses), "validation_loss": val_loss}

  fresh = lambda: parallel.replicate((train_step.init_student_state(params, tx), frozen), mesh)
  hooks = engine.Hooks(
    fresh=fresh, template=fresh, progress=lambda: dict(early), resume=early.update, finished=lambda: early["stopped"]
  )
  stage = engine.Stage("student", t.student_epochs, 1, t.checkpoint_every, t.max_to_keep, unit="epoch")
  state, _, _ = engine.run_stage(stage, workdir, advance, hooks, writer=writer, show_progress=progress)
  best = {**state.best_params, "student_stats": state.best_batch_stats}
  return best, {
    "epochs_run": early["epoch"],
    "best_epoch": early["best_epoch"],
    "best_validation_loss": early["best_loss"],
    "early_stopped": early["stopped"],
    "patience": patience,
  }


def _both_stages(
  cfg, nets, params, feats, val_feats, workdir, step_key, mesh, progress, penalty, eval_batch, writer
) -> tuple[dict, dict]:
  """Stage 1, the teacher flow; stage 2, student + autoencoder on the frozen teacher's outputs. Returns the
  trained parameters (flow, and the best student and autoencoder)."""
  params = dict(params)
  params["flow"] = train_flow(
    cfg, nets, params["flow"], feats, {"backbone": params["backbone"]}, workdir, mesh, progress, writer
  )
  # Stage 2 reads the flow's outputs as its targets.
  teach = compiler.jit(lambda p, f: method.teacher(nets, p, f))
  targets = lambda f: np.concatenate(
    [np.asarray(teach(params["flow"], f[i : i + eval_batch])) for i in range(0, len(f), eval_batch)] or [f[:0]]
  )
  train = {"features": feats, "target": targets(feats)}
  val = {"features": val_feats, "target": targets(val_feats)}
  frozen = {"backbone": params["backbone"], "flow": params["flow"]}
  best, summary = train_student(
    cfg, nets, params, train, val, frozen, workdir, step_key, mesh, progress, penalty, writer
  )
  return {**best, "flow": params["flow"]}, summary


def train_ast(cfg: AstConfig, workdir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Trains both stages, calibrates the threshold and saves the complete model; returns RUN/model."""
  with engine.run_directory(cfg, workdir, "training (EfficientAD-AST)") as run:
    return _train_ast(*run, progress=progress)


def _train_ast(saved_cfg: AstConfig, cfg: AstConfig, workdir: pathlib.Path, *, progress: bool) -> pathlib.Path:
  init_key, step_key = jax.random.split(jax.random.key(cfg.train.seed))
  mesh = parallel.data_mesh()
  if cfg.train.batch_size % jax.device_count():
    raise ValueError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {jax.device_count()} devices")

  # --- Data, networks, features of the training and validation normals.
  ds = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed)
  nets = method.build(cfg)
  params = method.init_params(nets, init_key, cfg.model.image_size)
  params["backbone"], backbone_source = load_backbone(cfg, params["backbone"])
  penalty = penalty_features(cfg, nets, params["backbone"])  # lazy: checks the settings now, reads at each step
  eval_batch = max(1, cfg.train.batch_size // jax.process_count()) * jax.process_count()
  feats = extract(nets, params["backbone"], ds.train_eval, eval_batch)
  val_feats = extract(nets, params["backbone"], ds.validation, eval_batch)
  if not len(val_feats):
    raise ValueError(
      "no validation images: early stopping and the threshold need them "
      "(data.validation_fraction > 0, or LOCO's validation/good)"
    )
  if len(feats) < cfg.train.batch_size:
    raise ValueError(f"{len(feats)} training images, fewer than train.batch_size {cfg.train.batch_size}")

  engine.write_config(workdir, saved_cfg)  # every check passed: the run directory records the run
  with engine.log_writer(workdir) as writer:
    trained, summary = _both_stages(
      cfg, nets, params, feats, val_feats, workdir, step_key, mesh, progress, penalty, eval_batch, writer
    )
  params.update(trained)

  # --- Threshold from validation normals, then the complete model.
  _, predict_fn = method.compiled_predict(cfg)
  threshold, validation_scores = calibration.threshold(
    predict_fn, params, ds.validation, cfg.maps.threshold_quantile, eval_batch
  )
  meta = {
    "config": config_lib.to_dict(saved_cfg),
    "image_size": cfg.model.image_size,
    "model_size": "ast",
    "teacher": "flow",
    "backbone": backbone_source,
    "penalty": "off" if penalty is None else "on",
    "threshold": threshold,
    "threshold_rule": f"{cfg.maps.threshold_quantile} quantile of validation image scores",
    "validation_scores": validation_scores,  # for other thresholds later (serving.thresholds)
    "flow_epochs": cfg.train.flow_epochs,
    "steps": summary["epochs_run"],
    "student": summary,
    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  path = saved_model.save(workdir / "model", method.METHOD, params, meta)
  log.info("saved the AST model to %s (threshold %.4f)", path, threshold)
  return path
