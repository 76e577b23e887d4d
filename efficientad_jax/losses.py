"""Training objective of EfficientAD (paper sections 3.2-3.3, SPEC section 3).

All inputs are NHWC feature maps. Losses are per-sample and then averaged over the batch: with the paper's
batch of one image per device this equals the reference exactly, and it keeps the data-parallel step
independent of how the global batch is split across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hard_loss(teacher: jnp.ndarray, student: jnp.ndarray, quantile: float) -> jnp.ndarray:
  """L_hard: mean of the squared errors at or above their `quantile` (0.999), per sample, batch-averaged.

  D = (T_hat - S)^2 over all C*H*W elements of one image; d_hard = quantile of D (linear interpolation, like
  torch.quantile / np.quantile); L_hard = mean(D[D >= d_hard]), written as a masked mean so shapes stay static
  under jit.

  Args:
    teacher: [B, H, W, C] normalised teacher features T_hat.
    student: [B, H, W, C] the student's teacher-predicting channels.
    quantile: in [0, 1].
  Returns:
    scalar loss.
  """
  if teacher.shape != student.shape:
    raise ValueError(f"hard_loss: teacher {teacher.shape} and student {student.shape} differ")
  d = jnp.square(teacher.astype(jnp.float32) - student.astype(jnp.float32)).reshape(teacher.shape[0], -1)
  d_hard = jax.vmap(lambda row: jnp.quantile(row, quantile))(d)
  mask = (d >= d_hard[:, None]).astype(jnp.float32)
  return jnp.mean(jnp.sum(d * mask, axis=1) / jnp.sum(mask, axis=1))


def hard_threshold(teacher: jnp.ndarray, student: jnp.ndarray, quantile: float) -> jnp.ndarray:
  """d_hard per sample, [B] (for logging and tests)."""
  d = jnp.square(teacher.astype(jnp.float32) - student.astype(jnp.float32)).reshape(teacher.shape[0], -1)
  return jax.vmap(lambda row: jnp.quantile(row, quantile))(d)


def penalty_loss(student_on_penalty: jnp.ndarray) -> jnp.ndarray:
  """L_penalty = mean(S(P)^2) over the teacher-predicting channels on penalty (ImageNet) images."""
  return jnp.mean(jnp.square(student_on_penalty.astype(jnp.float32)))


def mse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error over all elements: L_ae = mse(T_hat, A), L_stae = mse(A, S_ae)."""
  if a.shape != b.shape:
    raise ValueError(f"mse: shapes {a.shape} and {b.shape} differ")
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
