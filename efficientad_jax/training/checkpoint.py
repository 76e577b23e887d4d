"""Orbax checkpoints of the periodic training state, and the disk-space checks before any write.

Layout of a run directory (README, "Run directory"):
  RUN/checkpoints/<step>/{state,frozen,data}   training state, teacher+statistics, data-iterator state
  RUN/model/{arrays,meta}                      the complete model, of any method: `saved_model.py`
Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed mid-save
resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def tree_bytes(*trees: Any) -> int:
  """Bytes of every array leaf of `trees` (what a checkpoint of them writes, before compression)."""
  leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t) if hasattr(x, "shape")]
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)  # arrays or ShapeDtypeStructs


def check_space(directory: str | pathlib.Path, needed: int) -> None:
  """Raises OSError(ENOSPC) naming `directory` when its disk has less than `needed` bytes free: a full disk
  is reported before orbax starts writing (its failure mid-write is a storm of background-thread errors)."""
  folder = pathlib.Path(directory)
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  free = shutil.disk_usage(folder).free
  if free < needed:
    raise OSError(
      errno.ENOSPC,
      f"No space left on device: a checkpoint needs about {needed >> 20} MiB, {free >> 20} MiB are free",
      str(directory),
    )


@contextlib.contextmanager
def _disk_full_as_oserror(directory: Any):
  """orbax reports a full disk as ValueError('RESOURCE_EXHAUSTED: ... No space left on device'): re-raise it
  as the OSError(ENOSPC) it is, naming the checkpoint folder."""
  try:
    yield
  except Exception as e:
    if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
      raise OSError(errno.ENOSPC, "No space left on device while writing a checkpoint", str(directory)) from e
    raise


class TrainCheckpoints:
  """Periodic, asynchronous, atomic training checkpoints with `max_to_keep`.

  Each holds the TrainState, the frozen teacher and statistics, and the data iterator's state (JSON), so a
  resumed run continues exactly where the checkpoint was taken.
  """

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True
    )
    self._manager = ocp.CheckpointManager(
      pathlib.Path(directory).absolute(), options=options, item_names=("state", "frozen", "data")
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps (units) of every complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def check(self) -> None:
    """Raises the error of a failed asynchronous save (a disk that filled during the write) now, so that
    training stops at the next boundary instead of running on to the end without checkpoints."""
    with _disk_full_as_oserror(self._manager.directory):
      self._manager.check_for_errors()

  def save(self, step: int, state: Any, frozen: Any, data_state: dict) -> None:
    check_space(self._manager.directory, 2 * tree_bytes(state, frozen))  # the new one before the old goes
    with _disk_full_as_oserror(self._manager.directory):
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), frozen=ocp.args.StandardSave(frozen), data=ocp.args.JsonSave(data_state)
        ),
      )

  def restore(self, step: int, state_like: Any, frozen_like: Any) -> tuple[Any, Any, dict]:
    """Restores into the structure and shardings of `state_like` / `frozen_like` (arrays or ShapeDtypeStructs)."""
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(state_like)),
        frozen=ocp.args.StandardRestore(abstract(frozen_like)),
        data=ocp.args.JsonRestore(),
      ),
    )
    return out["state"], out["frozen"], out["data"]

  def wait(self) -> None:
    with _disk_full_as_oserror(self._manager.directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def finish(self) -> None:
    """Waits for the last asynchronous save, then closes the manager, even when the wait fails (a full
    disk): no orbax thread may outlive the error into interpreter shutdown."""
    try:
      self.wait()
    finally:
      self.close()
