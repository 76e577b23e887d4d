"""EfficientAD-AST training states, losses and pure steps (no I/O). The caller jits them
(`parallel.compile_step`); the flow's state is the shared `optim.TrainState`.

Both stages read precomputed backbone features (the backbone is frozen and the training images are not
augmented, so features are computed once per run):
  stage 1, teacher:  flow params <- Adam on nll_loss(flow(f, pe))                    (flow.py)
  stage 2, student:  L = mean (z - S[:C])^2 + mean (z - A)^2 + mean (A - S[C:])^2      on all elements
                         [+ mean S_P[:C]^2, the ImageNet penalty, when penalty features are given]
                     z = teacher output (frozen, precomputed), S = student([f | pe]), A = autoencoder(f),
                     S_P = student([f_P | pe]) on backbone features f_P of penalty images
Optimiser: `efficientad_jax.training.optim.make_optimizer(cfg.optim, steps)`, the one every method uses (PyTorch
Adam(lr, eps, weight_decay): coupled L2 added to the gradient before Adam's moments; AST: constant lr).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from efficientad_jax.efficientad_ast import inference as method
from efficientad_jax.models.flow import nll_loss
from efficientad_jax.training.optim import TrainState


@flax.struct.dataclass
class StudentState:
  step: jnp.ndarray
  params: dict  # {'student', 'autoencoder'}
  batch_stats: dict  # the student's BatchNorm running statistics
  opt_state: Any
  best_params: dict  # params and statistics at the best validation loss so far (early stopping)
  best_batch_stats: dict


def init_student_state(params: dict, tx: optax.GradientTransformation) -> StudentState:
  trainable = {"student": params["student"], "autoencoder": params["autoencoder"]}
  return keep_best(
    StudentState(
      step=jnp.zeros((), jnp.int32),
      params=trainable,
      batch_stats=params["student_stats"],
      opt_state=tx.init(trainable),
      best_params=trainable,
      best_batch_stats=params["student_stats"],
    )
  )


def flow_train_step(
  nets: method.Nets, tx: optax.GradientTransformation, state: TrainState, batch: dict[str, jnp.ndarray]
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """batch: 'features' [B, g, g, C], optional 'weight' [B, g, g] (downsampled foreground mask)."""
  f = batch["features"]

  def loss_fn(params):
    z, logdet = nets.flow.apply({"params": params}, f, method.cond(nets, f.shape[0]))
    return nll_loss(z, logdet, batch.get("weight"))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, tx), {"loss": loss}


def student_losses(
  nets: method.Nets, trainable: dict, batch_stats: dict, batch: dict[str, jnp.ndarray], dropout_key: jax.Array | None
) -> tuple[dict[str, jnp.ndarray], dict]:
  """Per-sample losses [B] ('loss_st', 'loss_ae', 'loss_stae', 'loss_penalty', 'loss') and the updated BN
  statistics.

  batch: 'features' [B, g, g, C], 'target' [B, g, g, C] (teacher z), optional 'penalty' [B, g, g, C] (backbone
  features of penalty images; training mode only). dropout_key None = evaluation mode (running BN statistics,
  no dropout); otherwise training mode.

  The penalty is EfficientAD's (paper section 3.2, docs/method.md §5.3): the mean square of the student's
  teacher-predicting outputs on a penalty image, L_P = mean_{g,g,C} S_P[:C]^2, added to the total. The student
  sees the penalty images in a separate training-mode call (their own batch statistics, as a separate
  PyTorch forward would), whose running-statistics update is dropped: the statistics used at inference
  describe the training images only.
  """
  c, f, z = nets.channels, batch["features"], batch["target"]
  train = dropout_key is not None
  x = jnp.concatenate([f, method.cond(nets, f.shape[0])], axis=-1)
  variables = {"params": trainable["student"], "batch_stats": batch_stats}
  if train:
    s, updated = nets.student.apply(variables, x, train=True, mutable=["batch_stats"])
    batch_stats = updated["batch_stats"]
    a = nets.autoencoder.apply(
      {"params": trainable["autoencoder"]}, f, deterministic=False, rngs={"dropout": dropout_key}
    )
  else:
    s = nets.student.apply(variables, x)
    a = nets.autoencoder.apply({"params": trainable["autoencoder"]}, f, deterministic=True)
  s, a = s.astype(jnp.float32), a.astype(jnp.float32)
  per_sample = lambda u, v: jnp.mean(jnp.square(u - v), axis=(1, 2, 3))
  out = {"loss_st": per_sample(z, s[..., :c]), "loss_ae": per_sample(z, a), "loss_stae": per_sample(a, s[..., c:])}
  out["loss_penalty"] = jnp.zeros(f.shape[:1], jnp.float32)
  if "penalty" in batch:
    if not train:
      raise ValueError("penalty features are a training input (evaluation mode has no penalty)")
    x_p = jnp.concatenate([batch["penalty"], method.cond(nets, batch["penalty"].shape[0])], axis=-1)
    s_p, _ = nets.student.apply(
      {"params": trainable["student"], "batch_stats": variables["batch_stats"]},
      x_p,
      train=True,
      mutable=["batch_stats"],
    )
    out["loss_penalty"] = jnp.mean(jnp.square(s_p[..., :c].astype(jnp.float32)), axis=(1, 2, 3))
  out["loss"] = out["loss_st"] + out["loss_ae"] + out["loss_stae"] + out["loss_penalty"]
  return out, batch_stats


def student_train_step(
  nets: method.Nets,
  tx: optax.GradientTransformation,
  state: StudentState,
  batch: dict[str, jnp.ndarray],
  key: jax.Array,
) -> tuple[StudentState, dict[str, jnp.ndarray]]:
  """One update of student + autoencoder; this step's dropout key is fold_in(key, step)."""
  dropout_key = jax.random.fold_in(key, state.step)

  def loss_fn(trainable):
    losses, stats = student_losses(nets, trainable, state.batch_stats, batch, dropout_key)
    losses = {k: jnp.mean(v) for k, v in losses.items()}
    return losses["loss"], (losses, stats)

  grads, (losses, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state), losses


def student_eval_losses(
  nets: method.Nets, state: StudentState, batch: dict[str, jnp.ndarray]
) -> dict[str, jnp.ndarray]:
  """Per-sample validation losses [B] of the current params (evaluation mode)."""
  return student_losses(nets, state.params, state.batch_stats, batch, None)[0]


def keep_best(state: StudentState) -> StudentState:
  """Copies (never aliases: the train step donates `params`) the current networks into `best_*`."""
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  return state.replace(best_params=copy(state.params), best_batch_stats=copy(state.batch_stats))
