"""Data parallelism for every method's steps: a 1-D device mesh, sharded batches, replicated state.

JAX's own multi-host runtime is the distributed engine: each process feeds its share of the global batch
(`shard_batch`), parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce of a
step jitted with these shardings (`compile_step`). This is what `jax.pmap` does, written as sharded jit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from efficientad_jax.training import compiler

_SPECS = {
  "r": jax.sharding.PartitionSpec(),
  "d": jax.sharding.PartitionSpec("data"),
  "s": jax.sharding.PartitionSpec(None, "data"),
}


def data_parallel_devices(batch_size: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
  """The devices that share a global batch of `batch_size` images: as many as divide it.

  One process: the largest d <= len(devices) with batch_size % d == 0 (the paper's batch of 1 runs on one
  device, exactly as on a single-device machine). P processes: every process feeds batch_size / P images and
  takes the same number k of its devices, the largest k <= its device count that divides batch_size / P.

  Args:
    batch_size: the global batch (`train.batch_size`).
    devices: all devices of all processes (default `jax.devices()`).
  Returns:
    The chosen devices, grouped by process in process order, each group in the given order.
  Raises:
    ValueError: batch_size < 1, or not a multiple of the process count.
  """
  if batch_size < 1:
    raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
  groups: dict[int, list[jax.Device]] = {}
  for d in jax.devices() if devices is None else devices:
    groups.setdefault(d.process_index, []).append(d)
  if batch_size % len(groups):
    raise ValueError(
      f"train.batch_size {batch_size} is not a multiple of the {len(groups)} processes: every "
      f"process feeds an equal share of the global batch"
    )
  share = batch_size // len(groups)
  k = max(k for k in range(1, min(len(g) for g in groups.values()) + 1) if share % k == 0)
  return [d for _, g in sorted(groups.items()) for d in g[:k]]


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the given devices (default: all devices of all processes), axis 'data'."""
  return jax.sharding.Mesh(jax.devices() if devices is None else devices, ("data",))


def sharding(mesh: jax.sharding.Mesh, kind: str) -> jax.sharding.NamedSharding:
  """'r': replicated on every device of the mesh; 'd': split along the leading (batch) axis; 's': stacked
  batches [K, B, ...], split along the batch axis B."""
  return jax.sharding.NamedSharding(mesh, _SPECS[kind])


def compile_step(
  fn: Callable, mesh: jax.sharding.Mesh, in_kinds: str, out_kinds: str, donate: Sequence[int] = ()
) -> Callable:
  """`fn` jitted for data parallelism: each argument / output is 'r' (replicated) or 'd' (sharded on 'data'),
  e.g. in_kinds="rrdr" for fn(state, frozen, batch, key). `donate`: argument positions updated in place."""
  shardings = lambda kinds: tuple(sharding(mesh, k) for k in kinds)
  out = shardings(out_kinds)
  return compiler.jit(
    fn, in_shardings=shardings(in_kinds), out_shardings=out[0] if len(out) == 1 else out, donate_argnums=tuple(donate)
  )


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, kind: str = "d") -> dict[str, jax.Array]:
  """Process-local NumPy batch -> global jax.Arrays sharded on 'data' (multi-host safe); kind 's' for stacked
  batches [K, B, ...] (`stack_batches`)."""
  sharded = sharding(mesh, kind)
  return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def stack_batches(batches: Sequence[dict]) -> dict[str, np.ndarray]:
  """K batches of the same keys and shapes -> one batch with a leading step axis [K, ...]."""
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree replicated on the mesh, so the first step compiles like every later one.

  Built from host values with `make_array_from_callback`, which is valid across processes (a plain
  `device_put` of process-local arrays onto a multi-process mesh is not). Every process must pass equal values.
  """
  replicated = sharding(mesh, "r")

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

  return jax.tree_util.tree_map(place, tree)


def new_state(init: Callable[[jax.Array], Any], key: jax.Array, mesh: jax.sharding.Mesh) -> Any:
  """`init(key)` replicated on the mesh (every process computes the same values from the same key): the state
  factory of every method. `init` runs as it is, not traced into a program of its own: every method builds it
  on a network initialisation compiled once per process (`models.init_params`, `models.init_network`), so a
  process's later runs (a sweep's, a test session's) start without compiling it again."""
  return replicate(init(key), mesh)


def state_template(init: Callable[[jax.Array], Any], key: jax.Array, mesh: jax.sharding.Mesh) -> Any:
  """The shapes, dtypes and (replicated) shardings of `init(key)`, computing nothing: what a checkpoint
  restores into."""
  return as_template(jax.eval_shape(init, key), mesh)


def as_template(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs replicated on the mesh (a restore target)."""
  replicated = sharding(mesh, "r")
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
