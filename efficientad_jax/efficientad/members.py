"""Many EfficientAD models trained in one program: the members of a group (docs/method.md §6).

A group is N runs of one config that differ in what they learn from (seed, category): one jitted step updates N
students, N autoencoders and N optimizer states on N batches with N keys (`jax.vmap` of the solo
`train_step.train_step`), so each kernel does the work of N runs. Members that share the teacher (the same
size's pretrained weights) share one copy of it, not N; each keeps its own teacher statistics.

  states = stack([train_step.init_state(params_i, tx) for i in ...])     # leading axis: the member
  step = compile_members_step(nets, cfg, tx)
  states, losses = step(states, teacher, stats, batches, keys)           # batches [N, B, ...], keys [N]

Each member's result is the one it would have had alone (tests/test_members.py states the bound): vmap batches
the same operations, and only the kernels' summation order may differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from efficientad_jax.config import Config
from efficientad_jax.efficientad import train_step
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.models import Models
from efficientad_jax.training import compiler
from efficientad_jax.training.optim import TrainState


def stack(trees: Sequence[Any]) -> Any:
  """Members' pytrees (states, statistics, batches) -> one pytree with a leading member axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, i: int) -> Any:
  """Member i of a stacked pytree."""
  return jax.tree_util.tree_map(lambda leaf: leaf[i], tree)


def members_step(
  nets: Models,
  cfg: Config,
  tx: optax.GradientTransformation,
  states: TrainState,
  teacher: dict,
  stats: TeacherStats,
  batches: dict[str, jnp.ndarray],
  keys: jax.Array,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One `train_step.train_step` of every member: states, stats, batches [N, B, ...] and keys [N] carry the
  member axis; the teacher is one copy, shared. Returns (states, losses [N] per term)."""

  def one(state, member_stats, batch, key):
    return train_step.train_step(nets, cfg, tx, state, train_step.Frozen(teacher, member_stats), batch, key)

  return jax.vmap(one)(states, stats, batches, keys)


def compile_members_step(nets: Models, cfg: Config, tx: optax.GradientTransformation) -> Callable:
  """`members_step` jitted, the states donated: fn(states, teacher, stats, batches, keys) -> (states, losses)."""
  return compiler.jit(functools.partial(members_step, nets, cfg, tx), donate_argnums=(0,))
