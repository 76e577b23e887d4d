"""The one training engine: what every method's run shares (EfficientAD, teacher distillation, AST).

A method brings its own pieces: a state pytree (what the step updates), a frozen pytree (what it reads but
never updates: teacher, statistics, backbone), a jitted `advance` of one unit (a step, or an AST epoch), and
JSON progress (the data iterator's position, early-stopping counters). The engine brings the rest:

  run directory   `run_directory`: one process per RUN (a lock), RUN/config.json written once every check
                  passed; after the first checkpoint only `config.RESUMABLE` fields may change (README "Run
                  directory").
  resume          `Stage` + `run_stage`: restore from RUN/checkpoints[/<stage>]/<unit> into a template, or
                  start fresh.
  loop            progress bar, TensorBoard scalars, a NaN stop checked BEFORE each save (a diverged state
                  never overwrites a good checkpoint), asynchronous orbax checkpoints, and on every exit
                  (divergence, Ctrl-C, a full disk) orbax's background work finished.
The state factory and the data-parallel jit live in `parallel.py`, the one optimizer in `optim.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import tqdm

from efficientad_jax import config as config_lib
from efficientad_jax.training import checkpoint, lock

log = logging.getLogger("efficientad_jax")


class TrainingDiverged(RuntimeError):
  """A loss became NaN or infinite; the last good checkpoint is kept."""


# --- The run directory.


def resolve_paths(cfg: Any, workdir: pathlib.Path) -> Any:
  """The synthetic dataset without a root is generated inside the run (RUN/data), never in a shared folder
  that another run with other synthetic settings could regenerate under it. Only the running config holds
  that absolute path: RUN/config.json and the model keep data.root empty, so a copied run still works.
  Configs whose data section is not a `DataConfig` (distillation's image source) are returned as they are."""
  data = cfg.data
  if isinstance(data, config_lib.DataConfig) and data.dataset == "synthetic" and not data.root:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(pathlib.Path(workdir) / "data")))
  return cfg


def has_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether the run has a complete checkpoint (RUN/checkpoints/<unit>, or <stage>/<unit>)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  return any(p.is_dir() and p.name.isdigit() for p in [*folder.glob("*"), *folder.glob("*/*")])


def as_written_now(saved: dict, cfg: Any) -> dict:
  """A saved config.json as this version writes it, so that forms of older versions (one int for an image size)
  and fields added since (at their defaults) are not taken for changes; as it is when it no longer parses."""
  try:
    return json.loads(config_lib.to_json(config_lib.from_dict(type(cfg), saved)))
  except (config_lib.ConfigError, TypeError, ValueError):
    return saved


def config_changes(workdir: pathlib.Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
  """{'section.field': (saved, new)} between RUN/config.json and `cfg`; raises ConfigError naming the fields
  when the run has a checkpoint and one of them is not in `config.RESUMABLE`."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  changed = config_lib.changed_fields(
    as_written_now(json.loads(path.read_text()), cfg), json.loads(config_lib.to_json(cfg))
  )
  fixed = sorted(set(changed) - config_lib.RESUMABLE) if changed and has_checkpoint(workdir) else []
  if fixed:
    diff = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in fixed)
    raise config_lib.ConfigError(
      f"{path} holds a different config ({diff}) and the run has checkpoints: resume with the saved "
      f"values, or use a new --workdir (a resumed run may change only {', '.join(sorted(config_lib.RESUMABLE))})"
    )
  return changed


def write_config(workdir: pathlib.Path, cfg: Any) -> None:
  """RUN/config.json. Until the run's first checkpoint exists, a corrected config simply replaces it; after,
  only the fields in `config.RESUMABLE` may change (`config_changes`). Every change is appended to
  RUN/config_history.jsonl."""
  changed = config_changes(workdir, cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  if changed:
    record = {
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "checkpointed": has_checkpoint(workdir),
      "changed": {k: list(v) for k, v in changed.items()},
    }
    with open(workdir / "config_history.jsonl", "a") as f:
      f.write(json.dumps(record, default=str) + "\n")
    log.info("config of %s changed: %s", workdir, ", ".join(changed))
  (workdir / "config.json").write_text(config_lib.to_json(cfg))


@contextlib.contextmanager
def run_directory(cfg: Any, workdir: str | pathlib.Path, what: str) -> Iterator[tuple[Any, Any, pathlib.Path]]:
  """Holds the run directory for one run of a method: yields (config as given, config as run, absolute workdir).

  In this order: the config is range-checked (a bad value fails before anything exists); the directory is
  locked (`lock.hold`: a second process on the same RUN is refused at once, naming the holder; in a multi-host
  run only the primary process, the writer, takes it); a refused resume fails (`config_changes`) before any
  data is read or anything written. The caller writes RUN/config.json (`write_config`) once its own checks
  (data, teacher, disk space) have passed; the config as given is what RUN/config.json and the model keep (no
  generated paths). The lock is released when the block ends, however it ends.
  """
  workdir = pathlib.Path(workdir).absolute()
  saved = config_lib.validate(cfg)
  with lock.hold(workdir, what, primary=jax.process_index() == 0):
    config_changes(workdir, saved)
    yield saved, resolve_paths(cfg, workdir), workdir


@contextlib.contextmanager
def log_writer(workdir: pathlib.Path) -> Iterator[Any]:
  """A TensorBoard writer on RUN/tensorboard for the primary process (None elsewhere or without tensorboardX),
  closed when the block ends, however it ends."""
  writer = None
  if jax.process_index() == 0:
    try:
      from tensorboardX import SummaryWriter  # optional
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard scalars")
    else:
      writer = SummaryWriter(str(workdir / "tensorboard"))
  try:
    yield writer
  finally:
    if writer is not None:
      writer.close()


def check_finite(metrics: dict[str, float], where: str) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise TrainingDiverged(
      f"{where}: non-finite loss {bad}; stopped, the last checkpoint is kept "
      "(rerun the same command, same --workdir, with a lower --set optim.learning_rate=..., "
      "or check the input images)"
    )


# --- The resumable loop.

# (state, frozen, first unit, count) -> (state, metrics after the last of the `count` units it ran)
Advance = Callable[[Any, Any, int, int], tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class Stage:
  """One resumable loop of a run.

  name: "" for a single-stage run (RUN/checkpoints/<unit>, TensorBoard 'train/'), else its sub-folder and tag
    (RUN/checkpoints/<name>/<unit>).
  total: units to run (optimizer steps, or epochs); log_every / checkpoint_every / max_to_keep in units.
  unit: what a unit is called in messages ("step", "epoch").
  per_dispatch: units one `advance` call may run (EfficientAD's train.steps_per_dispatch); calls end at every
    multiple of log_every and checkpoint_every and at total, so logging, NaN checks and checkpoints see the
    state between two calls.
  """

  name: str
  total: int
  log_every: int
  checkpoint_every: int
  max_to_keep: int
  unit: str = "step"
  per_dispatch: int = 1

  @classmethod
  def of_schedule(cls, schedule: config_lib.ScheduleConfig, name: str = "", per_dispatch: int = 1) -> Stage:
    """The stage of a run counted in optimizer steps (EfficientAD, distillation): its `train` section."""
    return cls(
      name,
      schedule.steps,
      schedule.log_every,
      schedule.checkpoint_every,
      schedule.max_to_keep,
      per_dispatch=per_dispatch,
    )

  def dispatch_size(self, done: int) -> int:
    """Units of the next call after `done`: per_dispatch, cut at the next log / checkpoint boundary or total."""
    to_boundary = min(every - done % every for every in (self.log_every, self.checkpoint_every))
    return min(self.per_dispatch, to_boundary, self.total - done)

  def directory(self, workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "checkpoints" / self.name if self.name else workdir / "checkpoints"


@dataclasses.dataclass
class Hooks:
  """What a method tells the engine besides its step.

  fresh: () -> (state, frozen) for a run without checkpoints (e.g. after fitting statistics).
  template: () -> (state, frozen) structures (arrays or ShapeDtypeStructs with shardings) to restore into.
  progress: () -> JSON saved with each checkpoint (data-iterator state, epoch counters).
  resume: called with that JSON after a restore.
  finished: () -> True to stop before `total` (early stopping); checked before every unit.
  """

  fresh: Callable[[], tuple[Any, Any]]
  template: Callable[[], tuple[Any, Any]]
  progress: Callable[[], dict] = dict
  resume: Callable[[dict], None] = lambda saved: None
  finished: Callable[[], bool] = lambda: False


def run_stage(
  stage: Stage, workdir: pathlib.Path, advance: Advance, hooks: Hooks, *, writer: Any = None, show_progress: bool = True
) -> tuple[Any, Any, list[tuple[int, dict[str, float]]]]:
  """Runs `stage` from its last complete checkpoint (or fresh) to `total` units; returns (state, frozen,
  [(unit, metrics)] at each logged unit of this call).

  `advance(state, frozen, first, count)` runs `count` units (`Stage.dispatch_size`). Dispatch is asynchronous:
  while the device runs one call the host prepares and copies the next call's inputs, and metrics stay on the
  device between logged units (no host sync per call); at a logged or checkpointed unit
  they are read, checked for NaN/inf (`TrainingDiverged` before the save, so the last good checkpoint stays),
  shown and written to TensorBoard.
  """
  ckpts = checkpoint.TrainCheckpoints(stage.directory(workdir), stage.max_to_keep)
  bar, history = None, []
  try:  # from here on, every exit finishes orbax's background work (or a disk-full error is a traceback storm)
    start = ckpts.latest_step()
    if start is None:
      state, frozen = hooks.fresh()
      start = 0
    else:
      state, frozen, saved = ckpts.restore(start, *hooks.template())
      hooks.resume(saved)
      log.info("resumed %s from %s at %s %d", stage.name or "training", stage.directory(workdir), stage.unit, start)
    bar = tqdm.tqdm(
      total=stage.total,
      initial=start,
      desc=stage.name or None,
      unit=stage.unit,
      disable=not show_progress or jax.process_index() != 0,
      dynamic_ncols=True,
    )
    done = start
    while done < stage.total and not hooks.finished():
      count = stage.dispatch_size(done)
      state, metrics = advance(state, frozen, done, count)
      done += count
      last = done == stage.total or hooks.finished()
      if done % stage.log_every == 0 or done % stage.checkpoint_every == 0 or last:
        ckpts.check()  # an earlier asynchronous save that failed stops the run here
        values = {k: float(v) for k, v in metrics.items()}
        check_finite(values, f"{stage.name or 'training'} {stage.unit} {done}")
        history.append((done, values))
        bar.set_postfix({k.replace("loss_", ""): f"{v:.4f}" for k, v in values.items()}, refresh=False)
        if writer is not None:
          for k, v in values.items():
            writer.add_scalar(f"{stage.name or 'train'}/{k}", v, done)
      if done % stage.checkpoint_every == 0 or last:
        ckpts.save(done, state, frozen, hooks.progress())
      bar.update(count)
  finally:  # also on divergence or Ctrl-C: the last good checkpoint's async save must complete
    if bar is not None:
      bar.close()
    ckpts.finish()
  return state, frozen, history
