"""The EfficientAD-AST training run: features -> teacher flow -> student + autoencoder -> threshold -> model.

`train_ast(cfg, workdir)` mirrors `efficientad_jax.trainer.train`: RUN/config.json (a restart with another
config is refused), resumable orbax checkpoints per stage (RUN/checkpoints/flow/<epoch>,
RUN/checkpoints/student/<epoch>; each also holds the frozen networks and a small JSON state), NaN stop, and the
complete model in RUN/model (`checkpoint.save_model`, meta['method'] = 'efficientad_ast').
Both stages read backbone features computed once per run from the un-augmented training images
(`Datasets.train_eval`) and validation normals; batches are drawn by a seeded per-epoch permutation.
Foreground masks: the data pipeline provides none for training images, so the flow NLL is a plain mean
(`flow.nll_loss` takes a weight where one exists; BUILD_NOTES.md, issue 17). Early stopping uses the
validation-normal loss only. With `data.penalty` set, every student step also sees the backbone features of a
batch of penalty images (EfficientAD's ImageNet penalty, `train_step.student_losses`); batch k of that stream is a
pure function of (k, seed), so a resumed run sees the same penalty images.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Callable

import jax
import numpy as np
import tqdm

from efficientad_jax import backend, checkpoint, train_step as base_step
from efficientad_jax import config as config_lib
from efficientad_jax.ast import efficientnet, method, train_step
from efficientad_jax.config import AstConfig
from efficientad_jax.data import eval_batches, make_datasets, pipeline
from efficientad_jax.trainer import TrainingDiverged, image_batches, resolve_paths, write_config

log = logging.getLogger("efficientad_jax")


def load_backbone(cfg: AstConfig, params: dict) -> tuple[dict, str]:
  """The frozen EfficientNet trunk: imported from torchvision's .pth, or (demo only) random, said loudly."""
  if cfg.backbone_weights:
    return efficientnet.load_torchvision(cfg.backbone_weights, cfg.backbone_width, cfg.backbone_depth,
                                         cfg.backbone_stages), cfg.backbone_weights
  log.warning("no backbone_weights: using a RANDOM EfficientNet trunk (fine for tests, not for results; pass "
              "a torchvision efficientnet_b5 state_dict .pth)")
  return params, "random"


def extract(nets: method.Nets, backbone: dict, records, batch_size: int) -> np.ndarray:
  """Backbone features of eval records, in order: float32 [N, g, g, C] on the host."""
  fn = backend.jit(lambda p, x: method.features(nets, p, x))
  out = [np.asarray(fn(backbone, images))[:n] for images, n in image_batches(records, batch_size)]
  return np.concatenate(out) if out else np.zeros((0, nets.grid, nets.grid, nets.channels), np.float32)


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int):
  """Index arrays of one epoch: a seeded permutation, the incomplete last batch dropped (static shapes)."""
  order = np.random.default_rng([seed, stage, epoch]).permutation(n)
  for i in range(n // batch_size):
    yield order[i * batch_size:(i + 1) * batch_size]


def _local(x: np.ndarray) -> np.ndarray:
  """This process's share of a global batch (every process builds the same global batch)."""
  k = x.shape[0] // jax.process_count()
  return x[jax.process_index() * k:(jax.process_index() + 1) * k]


def _check(value: float, what: str) -> None:
  if not math.isfinite(value):
    raise TrainingDiverged(f"{what}: non-finite loss {value}; stopped, the last checkpoint is kept "
                           "(lower learning_rate or check the input images)")


def train_flow(cfg: AstConfig, nets: method.Nets, flow_params: dict, feats: np.ndarray, frozen: dict,
               workdir: pathlib.Path, mesh, progress: bool) -> dict:
  """Stage 1: the teacher flow, `flow_epochs` epochs of NLL; resumable at checkpointed epochs."""
  tx = train_step.make_optimizer(cfg)
  step = train_step.compile_step(lambda s, b: train_step.flow_train_step(nets, tx, s, b), mesh, "rd", "rr", (0,))
  state, frozen = base_step.replicate((train_step.init_flow_state(flow_params, tx), frozen), mesh)
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints" / "flow", cfg.max_to_keep)
  start = ckpts.latest_step() or 0
  if start:
    state, _, _ = ckpts.restore(start, state, frozen)
    log.info("flow: resumed at epoch %d", start)
  for epoch in tqdm.trange(start, cfg.flow_epochs, desc="flow", disable=not progress, dynamic_ncols=True):
    losses = []
    for idx in epoch_batches(len(feats), cfg.batch_size, cfg.seed, 1, epoch):
      state, out = step(state, base_step.shard_batch({"features": _local(feats[idx])}, mesh))
      losses.append(out["loss"])
    _check(float(np.mean([float(v) for v in losses])), f"flow epoch {epoch + 1}")
    if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.flow_epochs:
      ckpts.save(epoch + 1, state, frozen, {"epoch": epoch + 1})
  ckpts.wait()
  ckpts.close()
  return state.params


def penalty_features(cfg: AstConfig, nets: method.Nets, backbone: dict) -> Callable[[int], np.ndarray] | None:
  """fn(step) -> backbone features [B / P, g, g, C] of this process's penalty images for student step `step`;
  None when `data.penalty` is off (said loudly, as in EfficientAD)."""
  source = pipeline.penalty_source(cfg.data.penalty, cfg.data.tfds_data_dir)
  if source is None:
    log.warning("no data.penalty source: training the AST student WITHOUT the ImageNet penalty (recorded in the "
                "model as 'penalty: off')")
    return None
  if cfg.data.penalty_resize < cfg.image_size:
    raise ValueError(f"data.penalty_resize {cfg.data.penalty_resize} is smaller than image_size {cfg.image_size}: "
                     f"the penalty image is resized to it and centre-cropped (the reference uses 2 x image_size)")
  batches = pipeline.penalty_batches(source, image_size=cfg.image_size,
                                     batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed,
                                     data_cfg=cfg.data, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  fn = backend.jit(lambda p, x: method.features(nets, p, x))
  return lambda step: np.asarray(fn(backbone, batches[step]))


def _validation_loss(eval_fn, state, val: dict[str, np.ndarray], batch_size: int, mesh) -> float:
  """Mean per-sample validation loss; the last chunk is padded by repetition and the padding ignored."""
  total, n = 0.0, len(val["features"])
  for i in range(0, n, batch_size):
    idx = np.arange(i, min(i + batch_size, n))
    pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    batch = base_step.shard_batch({k: _local(v[pad]) for k, v in val.items()}, mesh)
    total += float(np.sum(np.asarray(eval_fn(state, batch)["loss"])[:len(idx)]))
  return total / n


def train_student(cfg: AstConfig, nets: method.Nets, params: dict, train: dict, val: dict, frozen: dict,
                  workdir: pathlib.Path, key: jax.Array, mesh, progress: bool,
                  penalty: Callable[[int], np.ndarray] | None = None) -> tuple[dict, dict]:
  """Stage 2: student + autoencoder, early stopping on the validation loss; returns (best params, summary).

  `penalty` (from `penalty_features`) gives the penalty features of each global student step, or None."""
  tx = train_step.make_optimizer(cfg)
  step = train_step.compile_step(lambda s, b, k: train_step.student_train_step(nets, tx, s, b, k), mesh,
                                 "rdr", "rr", (0,))
  eval_fn = train_step.compile_step(lambda s, b: train_step.student_eval_losses(nets, s, b), mesh, "rd", "r")
  state, frozen = base_step.replicate((train_step.init_student_state(params, tx), frozen), mesh)
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints" / "student", cfg.max_to_keep)
  patience = max(1, int(cfg.patience_fraction * cfg.student_epochs))
  early = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
  if ckpts.latest_step():
    state, _, early = ckpts.restore(ckpts.latest_step(), state, frozen)
    log.info("student: resumed at epoch %d", early["epoch"])
  bar = tqdm.tqdm(total=cfg.student_epochs, initial=early["epoch"], desc="student", disable=not progress)
  while early["epoch"] < cfg.student_epochs and not early["stopped"]:
    epoch = early["epoch"]
    losses = []
    steps_per_epoch = len(train["features"]) // cfg.batch_size
    for i, idx in enumerate(epoch_batches(len(train["features"]), cfg.batch_size, cfg.seed, 2, epoch)):
      local = {k: _local(v[idx]) for k, v in train.items()}
      if penalty is not None:
        local["penalty"] = penalty(epoch * steps_per_epoch + i)
      batch = base_step.shard_batch(local, mesh)
      state, out = step(state, batch, key)
      losses.append(out["loss"])
    _check(float(np.mean([float(v) for v in losses])), f"student epoch {epoch + 1}")
    val_loss = _validation_loss(eval_fn, state, val, cfg.batch_size, mesh)
    early["epoch"] = epoch + 1
    if val_loss < early["best_loss"]:
      state = train_step.keep_best(state)
      early.update(best_loss=float(val_loss), best_epoch=epoch + 1, bad_epochs=0)
    else:
      early["bad_epochs"] += 1
      early["stopped"] = early["bad_epochs"] >= patience
    bar.set_postfix(train=f"{float(np.mean([float(v) for v in losses])):.4f}", val=f"{val_loss:.4f}")
    bar.update(1)
    if early["epoch"] % cfg.checkpoint_every == 0 or early["stopped"] or early["epoch"] == cfg.student_epochs:
      ckpts.save(early["epoch"], state, frozen, dict(early))
  bar.close()
  ckpts.wait()
  ckpts.close()
  best = {**state.best_params, "student_stats": state.best_batch_stats}
  return best, {"epochs_run": early["epoch"], "best_epoch": early["best_epoch"],
                "best_validation_loss": early["best_loss"], "early_stopped": early["stopped"],
                "patience": patience}


def calibrate_threshold(cfg: AstConfig, nets: method.Nets, params: dict, validation) -> float:
  """The `threshold_quantile` of validation-normal image scores (test images are never used)."""
  predict = method.make_ast_predict_fn(nets, cfg)
  detector = method.make_detector(params)
  scores = [float(predict(detector, b["image"], out_size=tuple(int(v) for v in b["orig_size"][0]))["score"][0])
            for b in eval_batches(validation, 1)]
  return float(np.quantile(scores, cfg.threshold_quantile))


def train_ast(cfg: AstConfig, workdir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Trains both stages, calibrates the threshold and saves the complete model; returns RUN/model."""
  workdir = pathlib.Path(workdir).absolute()
  saved_cfg = cfg  # RUN/config.json and the model keep a synthetic data.root empty (resolved at run time)
  cfg = resolve_paths(cfg, workdir)
  write_config(workdir, saved_cfg)
  init_key, step_key = jax.random.split(jax.random.key(cfg.seed))
  mesh = base_step.data_mesh()
  if cfg.batch_size % jax.device_count():
    raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {jax.device_count()} devices")

  # --- Data, networks, features of the training and validation normals.
  ds = make_datasets(cfg.data, image_size=cfg.image_size, seed=cfg.seed)
  nets = method.build(cfg)
  params = method.init_params(nets, init_key, cfg.image_size)
  params["backbone"], backbone_source = load_backbone(cfg, params["backbone"])
  penalty = penalty_features(cfg, nets, params["backbone"])  # lazy: checks the settings now, reads at each step
  eval_batch = max(1, cfg.batch_size // jax.process_count()) * jax.process_count()
  feats = extract(nets, params["backbone"], ds.train_eval, eval_batch)
  val_feats = extract(nets, params["backbone"], ds.validation, eval_batch)
  if not len(val_feats):
    raise ValueError("no validation images: early stopping and the threshold need them "
                     "(data.validation_fraction > 0, or LOCO's validation/good)")
  if len(feats) < cfg.batch_size:
    raise ValueError(f"{len(feats)} training images, fewer than batch_size {cfg.batch_size}")

  # --- Stage 1: the teacher flow.
  params["flow"] = train_flow(cfg, nets, params["flow"], feats, {"backbone": params["backbone"]}, workdir,
                              mesh, progress)

  # --- Stage 2: student + autoencoder on the frozen teacher's outputs.
  teach = backend.jit(lambda p, f: method.teacher(nets, p, f))
  targets = lambda f: np.concatenate([np.asarray(teach(params["flow"], f[i:i + eval_batch]))  # noqa: E731
                                      for i in range(0, len(f), eval_batch)] or [f[:0]])
  train = {"features": feats, "target": targets(feats)}
  val = {"features": val_feats, "target": targets(val_feats)}
  frozen = {"backbone": params["backbone"], "flow": params["flow"]}
  best, summary = train_student(cfg, nets, params, train, val, frozen, workdir, step_key, mesh, progress, penalty)
  params.update(best)

  # --- Threshold from validation normals, then the complete model.
  threshold = calibrate_threshold(cfg, nets, params, ds.validation)
  meta = {"config": config_lib.to_dict(saved_cfg), "image_size": cfg.image_size, "model_size": "ast",
          "teacher": "flow", "backbone": backbone_source, "penalty": "off" if penalty is None else "on",
          "threshold": threshold,
          "threshold_rule": f"{cfg.threshold_quantile} quantile of validation image scores",
          "flow_epochs": cfg.flow_epochs, "steps": summary["epochs_run"], "student": summary,
          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  path = method.save_ast_model(workdir / "model", params, meta)
  log.info("saved the AST model to %s (threshold %.4f)", path, threshold)
  return path
