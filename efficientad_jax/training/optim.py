"""The one optimizer of every method (docs/method.md §6): PyTorch's Adam with coupled L2 weight decay and a
step decay of the learning rate. EfficientAD uses the paper's decay; distillation and both AST stages set
`decay_factor` 1, a constant learning rate."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import optax

from efficientad_jax.config import OptimConfig


@flax.struct.dataclass
class TrainState:
  """What an optimizer step updates: the update count, the trainable parameters and the optimizer's state."""

  step: jnp.ndarray  # int32 scalar: number of updates applied
  params: Any  # the trainable parameters only (frozen networks are a separate argument of every step)
  opt_state: Any

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update (PyTorch's order: the coupled decay reads the parameters before the update)."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate of update i (0-based): `cfg.learning_rate`, times `decay_factor` from update
  int(decay_at_fraction * total_steps) on, where PyTorch's StepLR, stepped after every update, switches."""
  boundary = int(cfg.decay_at_fraction * total_steps)
  return optax.piecewise_constant_schedule(cfg.learning_rate, {boundary: cfg.decay_factor})


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """PyTorch `Adam(lr, weight_decay)` + `StepLR(step_size=int(0.95 N), gamma=0.1)`: every method's optimizer
  (EfficientAD; distillation and both AST stages with decay_factor 1, a constant learning rate).

  Coupled L2: the decay term is added to the gradient BEFORE Adam's moments (not AdamW's decoupled decay).
  """
  return optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)),
  )
