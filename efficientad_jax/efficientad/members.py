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

The members trainer (`members_trainer.py`) runs `compile_group_step`: the same step with a teacher per member
where their teachers differ (`teacher_axis=0`), an `active` mask (a member whose updates are kept), and the
data-parallel shardings of the solo step. `auto_members` sizes a group from XLA's memory analysis of that step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efficientad_jax import models
from efficientad_jax.config import Config
from efficientad_jax.efficientad import train_step
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.models import Models
from efficientad_jax.training import compiler, optim, parallel
from efficientad_jax.training.optim import TrainState

log = logging.getLogger("efficientad_jax")

# `auto_members` uses (1 - this) of the device's memory: the analysis does not see the copies of the data
# stream's batches, allocator fragmentation, or what another library (the compiler itself) holds.
AUTO_MARGIN = 0.25


def stack(trees: Sequence[Any]) -> Any:
  """Members' pytrees (states, statistics, batches) -> one pytree with a leading member axis."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, i: int) -> Any:
  """Member i of a stacked pytree."""
  return jax.tree_util.tree_map(lambda leaf: leaf[i], tree)


def take(tree: Any, indices: Sequence[int]) -> Any:
  """The members `indices` of a stacked pytree, in that order (a group without its dropped members)."""
  index = jnp.asarray(indices, jnp.int32)
  return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def members_step(
  nets: Models,
  cfg: Config,
  tx: optax.GradientTransformation,
  states: TrainState,
  teacher: dict,
  stats: TeacherStats,
  batches: dict[str, jnp.ndarray],
  keys: jax.Array,
  active: jax.Array | None = None,
  *,
  teacher_axis: int | None = None,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One `train_step.train_step` of every member: states, stats, batches [N, B, ...] and keys [N] carry the
  member axis; the teacher is one copy, shared (teacher_axis None), or one per member (teacher_axis 0).
  active [N] bool: the members whose new state is kept; the others keep theirs (default: all). Returns
  (states, losses [N] per term)."""

  def one(state, member_teacher, member_stats, batch, key):
    frozen = train_step.Frozen(member_teacher, member_stats)
    return train_step.train_step(nets, cfg, tx, state, frozen, batch, key)

  new, losses = jax.vmap(one, in_axes=(0, teacher_axis, 0, 0, 0))(states, teacher, stats, batches, keys)
  if active is not None:
    keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
    new = jax.tree_util.tree_map(keep, new, states)
  return new, losses


def compile_members_step(nets: Models, cfg: Config, tx: optax.GradientTransformation) -> Callable:
  """`members_step` jitted, the states donated: fn(states, teacher, stats, batches, keys) -> (states, losses)."""
  return compiler.jit(functools.partial(members_step, nets, cfg, tx), donate_argnums=(0,))


def compile_group_step(
  nets: Models,
  cfg: Config,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  teacher_axis: int | None,
) -> Callable:
  """`members_step` with its mask, jitted for data parallelism: fn(states, teacher, stats, batches, keys,
  active) -> (states, losses); states donated.

  Sharding (members x batch): the member axis is not sharded; every member's batch axis is split on 'data'
  (batches [N, B, ...] as 's', the solo step's 'd' behind a member axis), states, teacher, statistics, keys
  and mask are replicated. Each device thus runs every member on its share of the images, and XLA inserts the
  gradient all-reduce as in the solo step: any N works with any device count that divides the batch. (Sharding
  the member axis instead would let a batch of 1, the paper's, use several devices, but only when N is a
  multiple of the device count, and the shared teacher would still be replicated.)
  """
  fn = functools.partial(members_step, nets, cfg, tx, teacher_axis=teacher_axis)
  return parallel.compile_step(fn, mesh, "rrrsrr", "rr", donate=(0,))


# --- How many members fit on a device.


def memory_bytes(analysis: Any) -> int | None:
  """A compiled program's device memory (XLA's `memory_analysis`): arguments + outputs + temporaries, less the
  outputs that reuse donated arguments; None where the backend has no analysis."""
  if analysis is None:
    return None
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def members_that_fit(one: int, two: int, limit: int, margin: float) -> int:
  """Members of a group in `limit` bytes, from the compiled step's bytes for one and for two members: each
  member adds `two - one`, the rest (`one` minus that: a shared teacher, the program) is paid once; (1 -
  margin) of the limit is used, for what the analysis does not see (the data stream's copies, fragmentation).
  At least 1."""
  per_member = max(two - one, 1)
  fixed = max(one - per_member, 0)
  return max(1, int((limit * (1 - margin) - fixed) // per_member))


@functools.cache
def _cpu_note() -> None:  # once per process, not once per model size
  log.info(
    "members auto on a CPU backend: 1 member (on XLA:CPU a group trains slower per member than its members one "
    "after another: BUILD_NOTES.md, 'Members: many models in one program')"
  )


def auto_members(cfg: Config, limit: int | None = None, margin: float = AUTO_MARGIN) -> int:
  """As many members of `cfg` as fit the first device's memory (`limit` bytes, default its
  memory_stats()['bytes_limit']): the group step compiled for 1 and for 2 members, XLA's memory analysis of
  each (`group_step_bytes`), extrapolated (`members_that_fit`). On a CPU backend (no `limit` given), or
  where the device reports no limit or no analysis, 1."""
  if limit is None:
    if jax.default_backend() == "cpu":
      _cpu_note()
      return 1
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
      log.info("members auto: %s reports no memory limit, so 1 member", jax.devices()[0].device_kind)
      return 1
  one, two = group_step_bytes(cfg, 1), group_step_bytes(cfg, 2)
  if one is None or two is None:
    log.info("members auto: no memory analysis on this backend, so 1 member")
    return 1
  n = members_that_fit(one, two, limit, margin)
  log.info(
    "members auto: %d (%s %s: %.0f MiB for one member, %.0f MiB per further one, %.1f GiB device memory, "
    "%d%% kept free)",
    *(n, cfg.model.size, cfg.model.image_size, one / 2**20, (two - one) / 2**20, limit / 2**30, 100 * margin),
  )
  return n


def group_step_bytes(cfg: Config, n: int) -> int | None:
  """Device bytes of the group step of n members of `cfg` (`memory_bytes`), compiled for the shapes
  only: nothing is initialised, read or run."""
  mesh = parallel.data_mesh(parallel.data_parallel_devices(cfg.train.batch_size))
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = lambda k: train_step.init_state(models.init_params(nets, k, cfg.model.network_size), tx)
  shared = bool(cfg.train.teacher_checkpoint)
  spec = lambda shape, dtype, kind="r": jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.sharding(mesh, kind))
  stacked = lambda tree: jax.tree_util.tree_map(lambda x: spec((n, *x.shape), x.dtype), tree)
  key = jax.random.key(0)
  size, c = cfg.model.network_size, cfg.model.teacher_channels
  teacher = jax.eval_shape(lambda k: models.init_params(nets, k, size)["teacher"], key)
  names = ("image", "image_ae", "penalty") if cfg.data.penalty else ("image", "image_ae")
  args = (
    stacked(jax.eval_shape(init, key)),
    jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), teacher) if shared else stacked(teacher),
    stacked(jax.eval_shape(lambda: TeacherStats.identity(c))),
    {k: spec((n, cfg.train.batch_size, *size, 3), np.uint8, "s") for k in names},
    spec((n,), key.dtype),
    spec((n,), np.bool_),
  )
  step = compile_group_step(nets, cfg, tx, mesh, None if shared else 0)
  return memory_bytes(step.lower(*args).compile().memory_analysis())
