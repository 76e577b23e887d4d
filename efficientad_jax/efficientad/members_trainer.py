"""Members: N EfficientAD runs trained by one jitted step, each in its own ordinary run directory (BUILD_NOTES.md,
"Members: many models in one program").

  results = train_members([cfg_a, cfg_b], ["runs/a", "runs/b"])    # [MemberResult(workdir, model, error)]

A group is N configs that are equal but for data.category, data.root and train.seed (`check_group`). One program
(`members.compile_group_step`) updates all N: each step takes one batch from each member's own data stream, and
each member keeps its own networks, optimizer state, teacher statistics and dropout key. A pretrained teacher
(train.teacher_checkpoint, the same for all) is one copy, shared; the random demo teacher depends on the seed, so
then every member has its own (stacked, mapped by vmap).

Each member's run directory is an ordinary run: its lock, RUN/config.json, splits.json, RUN/checkpoints/<step>
exactly as the solo trainer writes them (either trainer resumes the other's), TensorBoard scalars, RUN/model;
`trainer.prepare_run`, `fresh_start` and `save_model` do the same work here as there. evaluate, predict, export
and the sweep see ordinary runs.

Failures stay per member: a member whose setup fails (its data, its lock, a refused resume), whose loss is
non-finite at a logged step (checked before its save, so its last good checkpoint stays), or whose checkpoint
cannot be written, is dropped with its own one-line error (`MemberResult.error`, also logged); the others go
on in a group rebuilt without it (one more compile, for the new N).

Resume: every member restores its own latest checkpoint. Members at different steps (a kill between two
members' saves) still run as one group, from the lowest step: a member ahead keeps its state (the step's
`active` mask) and reads no data until the group reaches its step. Every member thus takes exactly the steps
an uninterrupted group takes, with the same program. A member already at train.steps is only calibrated.

Devices: the solo step's data parallelism, behind a member axis: each member's batch is split on 'data', the
member axis is not sharded (`members.compile_group_step`). One step per call: train.steps_per_dispatch > 1 is
not used by a group (the steps and checkpoints are the same as with K = 1). Several processes (multi-host) run
it as they run the solo trainer, untested: a member dropped on one process only would split the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from efficientad_jax import config as config_lib
from efficientad_jax.config import Config
from efficientad_jax.efficientad import members, train_step, trainer
from efficientad_jax.training import checkpoint, engine, parallel

log = logging.getLogger("efficientad_jax")

GROUP_FIELDS = ("data.category", "data.root", "train.seed")  # what the members of a group may differ in


class MemberResult(NamedTuple):
  workdir: pathlib.Path
  model: pathlib.Path | None  # RUN/model; None when the member failed
  error: Exception | None  # why it failed (one line); None when it has its model


def check_group(cfgs: Sequence[Config], workdirs: Sequence[str | pathlib.Path]) -> None:
  """Raises ConfigError naming the first field that two members may not differ in (only GROUP_FIELDS may), or
  a run directory given twice."""
  if not cfgs or len(cfgs) != len(workdirs):
    raise config_lib.ConfigError(f"a group needs one run directory per config, got {len(cfgs)} and {len(workdirs)}")
  dirs = [pathlib.Path(w).resolve() for w in workdirs]
  twice = sorted({str(d) for d in dirs if dirs.count(d) > 1})
  if twice:
    raise config_lib.ConfigError(f"members of a group need their own run directories; given twice: {twice[0]}")
  for i, cfg in enumerate(cfgs[1:], 2):
    changed = {k: v for k, v in config_lib.changed_fields(cfgs[0], cfg).items() if k not in GROUP_FIELDS}
    if changed:
      field, (first, other) = next(iter(changed.items()))
      raise config_lib.ConfigError(
        f"members of a group may differ only in {', '.join(GROUP_FIELDS)}: member {i} has {field}={other!r}, "
        f"member 1 {first!r}"
      )


def label(cfg: Config) -> str:
  """'bottle S seed 0': what a member is called in logs and errors."""
  return f"{cfg.data.category or cfg.data.dataset} {cfg.model.size[0].upper()} seed {cfg.train.seed}"


@dataclasses.dataclass
class Member:
  """One run of the group: its prepared run directory, data stream, checkpoints, and where it stands."""

  index: int
  of: int
  label: str
  run: trainer.Prepared | None = None
  it: Any = None  # its training data iterator
  ckpts: checkpoint.TrainCheckpoints | None = None
  writer: Any = None  # TensorBoard (None without tensorboardX)
  start: int = 0  # the step it resumed at
  state: Any = None  # its own TrainState and Frozen, outside the loop (inside, they live in the group's stacks)
  frozen: Any = None
  model: pathlib.Path | None = None
  error: Exception | None = None

  @property
  def name(self) -> str:
    return f"member {self.index + 1}/{self.of} {self.label}"

  def attempt(self, fn: Callable, *args) -> bool:
    """fn(*args); an exception becomes this member's error (logged in one line): False."""
    try:
      fn(*args)
      return True
    except Exception as e:
      self.error = e
      log.error("%s failed: %s", self.name, " ".join(str(e).split()))
      return False

  def close(self) -> None:
    """Stops its data workers and finishes its last asynchronous save (a failure there is its error)."""
    if self.it is not None:
      self.it.close()
    if self.ckpts is not None:
      try:
        self.ckpts.finish()
      except Exception as e:
        self.error = self.error or e


def train_members(
  cfgs: Sequence[Config], workdirs: Sequence[str | pathlib.Path], *, progress: bool = True
) -> list[MemberResult]:
  """Trains, calibrates and saves every member's model (its RUN/model), each resumed from its own checkpoints.

  Returns one MemberResult per member, in the given order. Raises only for the group as a whole: configs that
  may not share a group (`check_group`), or a step that fails (e.g. out of memory)."""
  check_group(cfgs, workdirs)
  cfg = cfgs[0]
  devices = parallel.data_parallel_devices(cfg.train.batch_size)
  mesh = parallel.data_mesh(devices)
  method = trainer.pieces(cfg, mesh)  # networks, optimizer, state factory: the same for every member
  stage = engine.Stage.of_schedule(cfg.train)
  local_batch = cfg.train.batch_size // jax.process_count()
  log.info("%d members in one program; global batch %d on %d of %d devices", len(cfgs), cfg.train.batch_size,
           len(devices), jax.device_count())  # fmt: skip
  if cfg.train.steps_per_dispatch > 1:
    log.warning("train.steps_per_dispatch=%d: a group runs one step per call", cfg.train.steps_per_dispatch)
  group = [Member(i, len(cfgs), label(c)) for i, c in enumerate(cfgs)]
  with contextlib.ExitStack() as held:  # the members' locks and TensorBoard writers, until their models exist
    for m, c, w in zip(group, cfgs, workdirs):
      m.attempt(_open, m, held, c, w, method, mesh, stage, local_batch)
    try:
      for m in group:
        if m.error is None:
          m.attempt(_start, m, method, mesh, local_batch)
      _run_steps(cfg, stage, [m for m in group if m.error is None], method, mesh, progress)
    finally:  # also on Ctrl-C: grain's workers stop, the last asynchronous saves complete
      for m in group:
        m.close()
    for m in group:
      if m.error is None:
        m.attempt(_save_model, m, local_batch)
  return [MemberResult(pathlib.Path(w).absolute(), m.model, m.error) for m, w in zip(group, workdirs)]


# --- One member's run directory: opened, started (fresh or restored), saved.


def _open(m: Member, held: contextlib.ExitStack, cfg, workdir, method, mesh, stage, local_batch) -> None:
  """The solo trainer's checks and records (`trainer.prepare_run`), under the member's own lock."""
  saved_cfg, run_cfg, path = held.enter_context(engine.run_directory(cfg, workdir, "training"))
  m.run = trainer.prepare_run(saved_cfg, run_cfg, path, method, mesh)
  m.writer = held.enter_context(engine.log_writer(path))
  m.it = m.run.ds.train_iter(local_batch, jax.process_index(), jax.process_count())
  m.ckpts = checkpoint.TrainCheckpoints(stage.directory(path), stage.max_to_keep)


def _start(m: Member, method: trainer.Pieces, mesh: jax.sharding.Mesh, local_batch: int) -> None:
  """Its latest checkpoint restored (state, frozen, data position), or a fresh start as the solo trainer's."""
  start = m.ckpts.latest_step()
  if start is None:
    m.state, m.frozen = trainer.fresh_start(m.run, method, mesh, local_batch)
    return
  template = trainer.frozen_template(m.run.teacher, m.run.cfg.model.teacher_channels, mesh)
  m.state, m.frozen, data_state = m.ckpts.restore(start, m.run.state_like, template)
  m.it.set_state(data_state)
  m.start = start
  log.info("%s resumed from %s at step %d", m.name, m.run.workdir / "checkpoints", start)


def _save_model(m: Member, local_batch: int) -> None:
  m.model = trainer.save_model(m.run, m.state, m.frozen, local_batch)


# --- The group's steps.


def _eta_line(clock: tuple[float, int] | None, done: int, total: int, n: int) -> tuple[float, int]:
  """Logs the group's speed and ETA since the first checked step (`clock`: its time and step; the compile
  before it is not counted); returns the clock."""
  now = time.perf_counter()
  if clock is None or done == clock[1]:
    return (now, done)
  rate = (done - clock[1]) / max(now - clock[0], 1e-9)
  left = int((total - done) / rate)
  eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
  log.info("group of %d members: step %d/%d, %.2f steps/s, ETA %s", n, done, total, rate, eta)
  return clock


class Stacks(NamedTuple):
  """The live members' arrays with a leading member axis (the teacher without one when shared)."""

  states: Any
  teacher: Any
  stats: Any
  keys: jax.Array


def _stacks(live: Sequence[Member], shared_teacher: bool, mesh: jax.sharding.Mesh) -> Stacks:
  """Stacks the members' states and frozen parts, replicated on the mesh; the members drop their own copies."""
  place = lambda tree: jax.device_put(tree, parallel.sharding(mesh, "r"))
  teachers = [m.frozen.teacher for m in live]
  out = Stacks(
    place(members.stack([m.state for m in live])),
    teachers[0] if shared_teacher else place(members.stack(teachers)),
    place(members.stack([m.frozen.stats for m in live])),
    place(jnp.stack([m.run.step_key for m in live])),
  )
  for m in live:
    m.state = m.frozen = None
  return out


def _frozen(stacks: Stacks, j: int, shared_teacher: bool) -> train_step.Frozen:
  """Member j's frozen part as a solo run checkpoints it."""
  teacher = stacks.teacher if shared_teacher else members.member(stacks.teacher, j)
  return train_step.Frozen(teacher=teacher, stats=members.member(stacks.stats, j))


def _without(stacks: Stacks, keep: list[int], shared_teacher: bool, mesh: jax.sharding.Mesh) -> Stacks:
  """The stacks of the members `keep` only (after a member was dropped)."""
  place = lambda tree: jax.device_put(members.take(tree, keep), parallel.sharding(mesh, "r"))
  teacher = stacks.teacher if shared_teacher else place(stacks.teacher)
  return Stacks(place(stacks.states), teacher, place(stacks.stats), place(stacks.keys))


def _batches(live: Sequence[Member], active: Sequence[bool], mesh: jax.sharding.Mesh, blank: dict | None):
  """One batch per member, stacked [N, B, ...] and sharded ('s'); a member that waits (not active) reads no
  data and gets zeros. Returns (batches, the zero batch)."""
  host = [next(m.it) if a else None for m, a in zip(live, active)]
  if blank is None:
    blank = {k: np.zeros_like(v) for k, v in next(b for b in host if b is not None).items()}
  stacked = parallel.stack_batches([blank if b is None else b for b in host])
  return parallel.shard_batch(stacked, mesh, "s"), blank


def _check(m: Member, values: dict[str, float], done: int, total: int) -> None:
  """The solo loop's checks at a logged step (a failed asynchronous save, a non-finite loss), then its log line
  and TensorBoard scalars."""
  m.ckpts.check()
  engine.check_finite(values, f"{m.name} step {done}")
  terms = tuple(values[k] for k in ("loss", "loss_st", "loss_ae", "loss_stae"))
  log.info("%s: step %d/%d loss %.4f (st %.4f, ae %.4f, stae %.4f)", m.name, done, total, *terms)
  if m.writer is not None:
    for k, v in values.items():
      m.writer.add_scalar(f"train/{k}", v, done)


def _after_step(
  live: Sequence[Member],
  active: Sequence[bool],
  stacks: Stacks,
  losses: dict[str, jax.Array],
  done: int,
  stage: engine.Stage,
  shared: bool,
  postfix: dict[str, str],
) -> list[bool]:
  """What the solo loop does between two calls, per active member: at a logged or checkpointed step its checks
  (`_check`) BEFORE its save, at a checkpointed step its save. Returns which members are still good."""
  last = done == stage.total
  ok = list(active)
  if done % stage.log_every == 0 or done % stage.checkpoint_every == 0 or last:
    values = jax.device_get(losses)
    for j, m in enumerate(live):
      if active[j]:
        ok[j] = m.attempt(_check, m, {k: float(v[j]) for k, v in values.items()}, done, stage.total)
        postfix[f"{m.index + 1}"] = f"{values['loss'][j]:.4f}" if ok[j] else "failed"
  if done % stage.checkpoint_every == 0 or last:
    for j, m in enumerate(live):
      if ok[j]:
        state = members.member(stacks.states, j)
        ok[j] = m.attempt(m.ckpts.save, done, state, _frozen(stacks, j, shared), m.it.get_state())
  return ok


def _run_steps(
  cfg: Config,
  stage: engine.Stage,
  started: Sequence[Member],
  method: trainer.Pieces,
  mesh: jax.sharding.Mesh,
  show_progress: bool,
) -> None:
  """Steps every started member to stage.total in one program; at the end each holds its state and frozen part.

  Like `engine.run_stage`: the losses stay on the device between logged steps, and a member that fails its
  checks or its save (`_after_step`) is dropped: the group goes on without it."""
  live = [m for m in started if m.start < stage.total]
  if not live:
    return
  shared = bool(cfg.train.teacher_checkpoint)  # a pretrained teacher; the random one depends on the seed
  step = members.compile_group_step(method.nets, cfg, method.tx, mesh, None if shared else 0)
  stacks = _stacks(live, shared, mesh)
  done = min(m.start for m in live)
  hidden = not show_progress or jax.process_index() != 0
  bar = tqdm.tqdm(total=stage.total, initial=done, unit="step", disable=hidden, dynamic_ncols=True)
  mask, blank, postfix, clock = None, None, {}, None
  try:
    while live and done < stage.total:
      bar.set_description(f"{len(live)} members", refresh=False)
      active = [m.start <= done for m in live]  # a member ahead (resumed later) waits for the group
      if mask is None or mask[0] != active:
        mask = (active, parallel.replicate(np.array(active), mesh))
      batches, blank = _batches(live, active, mesh, blank)
      states, losses = step(stacks.states, stacks.teacher, stacks.stats, batches, stacks.keys, mask[1])
      stacks = stacks._replace(states=states)
      done += 1
      ok = _after_step(live, active, stacks, losses, done, stage, shared, postfix)
      bar.set_postfix(postfix, refresh=False)
      if done % stage.log_every == 0:
        clock = _eta_line(clock, done, stage.total, len(live))
      bar.update(1)
      if not all(good or not a for a, good in zip(active, ok)):  # drop the members that failed
        keep = [j for j, (a, good) in enumerate(zip(active, ok)) if good or not a]
        live, mask = [live[j] for j in keep], None
        stacks = _without(stacks, keep, shared, mesh) if live else stacks
  finally:
    bar.close()
  for j, m in enumerate(live):
    m.state, m.frozen = members.member(stacks.states, j), _frozen(stacks, j, shared)
