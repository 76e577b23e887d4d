"""EfficientAD's training state and pure train step (paper §3.2-§3.3; docs/method.md §5-§6). No I/O here.

The caller compiles `train_step` (`compile_train_step`; `compile_train_steps` for K steps per call: the batch
sharded over a 1-D device mesh, parameters replicated, XLA inserts the gradient all-reduce; `parallel.py`). Only the
student and the autoencoder are
differentiated; the teacher and its statistics are a separate, frozen argument. The optimizer is
`optim.make_optimizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from efficientad_jax.config import Config
from efficientad_jax.efficientad.losses import hard_loss, mse, penalty_loss
from efficientad_jax.efficientad.normalization import TeacherStats, normalize_teacher
from efficientad_jax.models import Models
from efficientad_jax.training import parallel
from efficientad_jax.training.optim import TrainState


@flax.struct.dataclass
class Frozen:
  """What training reads but never updates."""

  teacher: dict  # teacher Flax params
  stats: TeacherStats


def init_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
  """The trainable part of fresh parameters {'teacher', 'student', 'autoencoder'}: student and autoencoder."""
  return TrainState.create({"student": params["student"], "autoencoder": params["autoencoder"]}, tx)


def compute_losses(
  nets: Models, cfg: Config, trainable: dict, frozen: Frozen, batch: dict[str, jnp.ndarray], dropout_key: jax.Array
) -> dict[str, jnp.ndarray]:
  """All loss terms of one step; 'loss' is the total L_st + L_ae + L_stae.

  batch: 'image' [B, S, S, 3] normal images, 'image_ae' the same after colour jitter, optional 'penalty'
  [B, S, S, 3] penalty images (L_penalty is omitted without them).
  """
  c = nets.teacher.out_channels
  x, x_ae = batch["image"], batch["image_ae"]
  b = x.shape[0]
  # The networks compute in model.dtype (bfloat16 for mixed precision); the losses, the 0.999 quantile and the
  # teacher normalisation see float32 outputs.
  f32 = lambda y: y.astype(jnp.float32)
  # One teacher call and one student call over the concatenated inputs: same result, fewer kernels.
  teacher_in = jnp.concatenate([x, x_ae])
  t = normalize_teacher(f32(nets.teacher.apply({"params": frozen.teacher}, teacher_in)), frozen.stats)
  t = jax.lax.stop_gradient(t)
  student_in = [x, x_ae] + ([batch["penalty"]] if "penalty" in batch else [])
  s = f32(nets.student.apply({"params": trainable["student"]}, jnp.concatenate(student_in)))
  a = f32(
    nets.autoencoder.apply(
      {"params": trainable["autoencoder"]}, x_ae, deterministic=False, rngs={"dropout": dropout_key}
    )
  )
  out = {
    "loss_hard": hard_loss(t[:b], s[:b, ..., :c], cfg.loss.hard_quantile),
    "loss_ae": mse(t[b:], a),
    "loss_stae": mse(a, s[b : 2 * b, ..., c:]),
  }
  out["loss_penalty"] = penalty_loss(s[2 * b :, ..., :c]) if "penalty" in batch else jnp.zeros(())
  out["loss_st"] = out["loss_hard"] + out["loss_penalty"]
  out["loss"] = out["loss_st"] + out["loss_ae"] + out["loss_stae"]
  return out


def normalize_images(batch: dict[str, jnp.ndarray], mean, std) -> dict[str, jnp.ndarray]:
  """uint8 images of the training stream -> float32 network input: x / 255, minus mean, over std per channel
  (docs/method.md §4.1), the host's `preprocess.network_input(x)` in float32 (equal up to float32
  rounding, |diff| <= 1e-6: XLA may divide through a reciprocal). The stream sends uint8, a quarter of the bytes
  to copy and move; float inputs pass as they are."""
  m, s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return {
    k: (v.astype(jnp.float32) / jnp.float32(255.0) - m) / s if v.dtype == jnp.uint8 else v for k, v in batch.items()
  }


def train_step(
  nets: Models,
  cfg: Config,
  tx: optax.GradientTransformation,
  state: TrainState,
  frozen: Frozen,
  batch: dict[str, jnp.ndarray],
  key: jax.Array,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimisation step on a batch of uint8 (`normalize_images`) or normalised float32 images. `key` is the
  run's base key; this step's key is fold_in(key, step)."""
  dropout_key = jax.random.fold_in(key, state.step)
  batch = normalize_images(batch, cfg.data.mean, cfg.data.std)

  def loss_fn(trainable):
    losses = compute_losses(nets, cfg, trainable, frozen, batch, dropout_key)
    return losses["loss"], losses

  grads, losses = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads, tx), losses


def train_steps(
  nets: Models,
  cfg: Config,
  tx: optax.GradientTransformation,
  state: TrainState,
  frozen: Frozen,
  batches: dict[str, jnp.ndarray],
  key: jax.Array,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """K optimisation steps in one call: `train_step` scanned over batches stacked on a leading axis.

  batches: the `train_step` batch with a leading step axis, e.g. 'image' [K, B, S, S, 3]. Returns the state
  after the K steps and the losses of the last one (what K single steps report at that step). Every step folds
  its own number into `key`, so the result equals K calls of `train_step`.
  """
  state, losses = jax.lax.scan(lambda st, batch: train_step(nets, cfg, tx, st, frozen, batch, key), state, batches)
  return state, jax.tree_util.tree_map(lambda v: v[-1], losses)


def compile_train_step(
  nets: Models, cfg: Config, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> Callable:
  """`train_step` jitted for data parallelism: batch sharded on 'data', everything else replicated, the state
  donated (updated in place). Returns fn(state, frozen, batch [B, ...], key) -> (state, losses)."""
  return parallel.compile_step(functools.partial(train_step, nets, cfg, tx), mesh, "rrdr", "rr", donate=(0,))


def compile_train_steps(
  nets: Models, cfg: Config, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> Callable:
  """`train_steps` jitted like `compile_train_step`, the stacked batches [K, B, ...] sharded on their batch axis
  ('s'). Returns fn(state, frozen, batches, key) -> (state, the last step's losses); one compile per K.

  Its loop body is one program whatever K, so K one-step calls of it equal one K-step call bit for bit (a
  resumed run may change K). The straight-line `compile_train_step` compiles to other kernels, whose sums
  round differently: equal within float rounding (BUILD_NOTES.md "Training feed"). XLA:CPU runs loop bodies
  without its fast matmul and convolution kernels (~35x slower, measured), so K > 1 is for accelerators.
  """
  return parallel.compile_step(functools.partial(train_steps, nets, cfg, tx), mesh, "rrsr", "rr", donate=(0,))
