"""Training state, optimizer and the pure train step (paper §3.2-§3.3; docs/method.md §5-§6). No I/O here.

The caller compiles `train_step` with `backend.jit` (see `compile_train_step` for the data-parallel version):
the batch is sharded over a 1-D device mesh, parameters are replicated, and XLA inserts the gradient
all-reduce. Only the student and the autoencoder are differentiated; the teacher and its statistics are a
separate, frozen argument.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efficientad_jax import backend
from efficientad_jax.config import Config, OptimConfig
from efficientad_jax.losses import hard_loss, mse, penalty_loss
from efficientad_jax.models import Models
from efficientad_jax.normalization import TeacherStats, normalize_teacher


@flax.struct.dataclass
class Frozen:
  """What training reads but never updates."""

  teacher: dict  # teacher Flax params
  stats: TeacherStats


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: number of updates applied
  params: dict  # {'student', 'autoencoder'}
  opt_state: Any


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """PyTorch `Adam(lr, weight_decay)` + `StepLR(step_size=int(0.95 N), gamma=0.1)`.

  Coupled L2: the decay term is added to the gradient BEFORE Adam's moments (not AdamW's decoupled decay).
  """
  boundary = int(cfg.decay_at_fraction * total_steps)
  schedule = optax.piecewise_constant_schedule(cfg.learning_rate, {boundary: cfg.decay_factor})
  return optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.scale_by_learning_rate(schedule),
  )


def init_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
  trainable = {"student": params["student"], "autoencoder": params["autoencoder"]}
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))


def compute_losses(nets: Models, cfg: Config, trainable: dict, frozen: Frozen, batch: dict[str, jnp.ndarray],
                   dropout_key: jax.Array) -> dict[str, jnp.ndarray]:
  """All loss terms of one step; 'loss' is the total L_st + L_ae + L_stae.

  batch: 'image' [B, S, S, 3] normal images, 'image_ae' the same after colour jitter, optional 'penalty'
  [B, S, S, 3] penalty images (L_penalty is omitted without them).
  """
  c = nets.teacher.out_channels
  x, x_ae = batch["image"], batch["image_ae"]
  b = x.shape[0]
  # One teacher call and one student call over the concatenated inputs: same result, fewer kernels.
  teacher_in = jnp.concatenate([x, x_ae])
  t = normalize_teacher(nets.teacher.apply({"params": frozen.teacher}, teacher_in), frozen.stats)
  t = jax.lax.stop_gradient(t)
  student_in = [x, x_ae] + ([batch["penalty"]] if "penalty" in batch else [])
  s = nets.student.apply({"params": trainable["student"]}, jnp.concatenate(student_in))
  a = nets.autoencoder.apply({"params": trainable["autoencoder"]}, x_ae, deterministic=False,
                             rngs={"dropout": dropout_key})
  out = {"loss_hard": hard_loss(t[:b], s[:b, ..., :c], cfg.loss.hard_quantile),
         "loss_ae": mse(t[b:], a),
         "loss_stae": mse(a, s[b:2 * b, ..., c:])}
  out["loss_penalty"] = penalty_loss(s[2 * b:, ..., :c]) if "penalty" in batch else jnp.zeros(())
  out["loss_st"] = out["loss_hard"] + out["loss_penalty"]
  out["loss"] = out["loss_st"] + out["loss_ae"] + out["loss_stae"]
  return out


def train_step(nets: Models, cfg: Config, tx: optax.GradientTransformation, state: TrainState, frozen: Frozen,
               batch: dict[str, jnp.ndarray], key: jax.Array) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimisation step. `key` is the run's base key; this step's key is fold_in(key, step)."""
  dropout_key = jax.random.fold_in(key, state.step)

  def loss_fn(trainable):
    losses = compute_losses(nets, cfg, trainable, frozen, batch, dropout_key)
    return losses["loss"], losses

  grads, losses = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), losses


def data_parallel_devices(batch_size: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
  """The devices that share a global batch of `batch_size` images: as many as divide it.

  One process: the largest d <= len(devices) with batch_size % d == 0 (the paper's batch of 1 runs on one
  device, exactly as on a single-device machine). P processes: every process feeds batch_size / P images and
  takes the same number k of its devices, the largest k <= its device count that divides batch_size / P.

  Args:
    batch_size: the global batch (`TrainConfig.batch_size`).
    devices: all devices of all processes (default `jax.devices()`).
  Returns:
    The chosen devices, grouped by process in process order, each group in the given order.
  Raises:
    ValueError: batch_size < 1, or not a multiple of the process count.
  """
  if batch_size < 1:
    raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
  groups: dict[int, list[jax.Device]] = {}
  for d in (jax.devices() if devices is None else devices):
    groups.setdefault(d.process_index, []).append(d)
  if batch_size % len(groups):
    raise ValueError(f"train.batch_size {batch_size} is not a multiple of the {len(groups)} processes: every "
                     f"process feeds an equal share of the global batch")
  share = batch_size // len(groups)
  k = max(k for k in range(1, min(len(g) for g in groups.values()) + 1) if share % k == 0)
  return [d for _, g in sorted(groups.items()) for d in g[:k]]


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over the given devices (default: all devices of all processes), axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(devices, ("data",))


def compile_train_step(nets: Models, cfg: Config, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` jitted for data parallelism: batch sharded on 'data', everything else replicated.

  The state is donated (updated in place). Returns fn(state, frozen, batch, key) -> (state, losses).
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = functools.partial(train_step, nets, cfg, tx)
  return backend.jit(step, in_shardings=(replicated, replicated, sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0)


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local NumPy batch -> global jax.Arrays sharded on 'data' (multi-host safe)."""
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree (state, frozen) replicated on the mesh, so the first step compiles like every later one.

  Built from host values with `make_array_from_callback`, which is valid across processes (a plain
  `device_put` of process-local arrays onto a multi-process mesh is not). Every process must pass equal values.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(place, tree)
