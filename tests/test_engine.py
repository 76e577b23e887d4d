"""The training engine on a toy method (a scalar state, no networks): resume equals an uninterrupted run, JSON
progress travels with the checkpoints, a NaN stops before any save, early stopping ends a stage and stays
ended, and the run directory's config rule. The three real methods run on it in test_trainer, test_distill
and test_ast_training."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from efficientad_jax import config as config_lib
from efficientad_jax.training import engine
from efficientad_jax.training.checkpoint import TrainCheckpoints


class Toy:
  """state x <- 0.5 x + unit + frozen; `seen` counts the units run, saved as the JSON progress."""

  def __init__(self, nan_at=None, stop_after=None, interrupt_at=None):
    self.nan_at, self.stop_after, self.interrupt_at = nan_at, stop_after, interrupt_at
    self.progress = {"seen": 0, "stopped": False}
    self.calls = []  # (first unit, count) of every advance call

  def advance(self, state, frozen, first, count):
    self.calls.append((first, count))
    x = state["x"]
    for unit in range(first, first + count):
      if unit == self.interrupt_at:
        raise KeyboardInterrupt
      x = 0.5 * x + unit + frozen["offset"]
      if unit == self.nan_at:
        x = x * jnp.nan
    self.progress["seen"] += count
    self.progress["stopped"] = self.stop_after is not None and self.progress["seen"] >= self.stop_after
    return {"x": x}, {"loss": x}

  def hooks(self):
    fresh = lambda: ({"x": jnp.zeros((), jnp.float32)}, {"offset": jnp.ones((), jnp.float32)})
    return engine.Hooks(
      fresh=fresh,
      template=fresh,
      progress=lambda: dict(self.progress),
      resume=self.progress.update,
      finished=lambda: self.progress["stopped"],
    )


STAGE = engine.Stage("toy", total=7, log_every=1, checkpoint_every=2, max_to_keep=5)


def run(workdir, toy, stage=STAGE):
  return engine.run_stage(stage, workdir, toy.advance, toy.hooks(), show_progress=False)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
  full, _, history = run(tmp_path / "a", Toy())
  assert [u for u, _ in history] == list(range(1, 8))
  expected = 0.0
  for unit in range(7):
    expected = 0.5 * expected + unit + 1
  assert float(full["x"]) == expected

  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "b", Toy(interrupt_at=5))
  assert TrainCheckpoints(tmp_path / "b" / "checkpoints" / "toy", 5).latest_step() == 4
  toy = Toy()
  resumed, _, history = run(tmp_path / "b", toy)
  assert [u for u, _ in history] == [5, 6, 7]  # units 5..7 run again from the checkpoint of unit 4
  assert float(resumed["x"]) == float(full["x"])
  assert toy.progress["seen"] == 7  # the JSON progress came back with the checkpoint (4) and went on


def test_nan_stops_before_the_save_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(engine.TrainingDiverged, match="toy step 4: non-finite loss"):
    run(tmp_path, Toy(nan_at=3))  # unit 3 is the 4th step, a checkpoint step
  ckpts = TrainCheckpoints(tmp_path / "checkpoints" / "toy", 5)
  assert ckpts.all_steps() == [2]
  state, _, progress = ckpts.restore(2, *Toy().hooks().template())
  assert np.isfinite(float(state["x"])) and progress["seen"] == 2
  ckpts.close()


def test_early_stop_ends_the_stage_and_a_rerun_stays_stopped(tmp_path):
  toy = Toy(stop_after=3)
  state, _, history = run(tmp_path, toy)
  assert [u for u, _ in history] == [1, 2, 3]
  ckpts = TrainCheckpoints(tmp_path / "checkpoints" / "toy", 5)
  assert ckpts.latest_step() == 3  # the last unit run is saved even off the checkpoint_every grid
  ckpts.close()
  again = Toy(stop_after=3)
  state2, _, history2 = run(tmp_path, again)
  assert history2 == [] and again.progress == {"seen": 3, "stopped": True}
  assert float(state2["x"]) == float(state["x"])


def test_run_directory_checks_before_anything_is_written(tmp_path):
  cfg = config_lib.Config()
  bad = config_lib.override(cfg, ["train.steps=0"])
  with pytest.raises(config_lib.ConfigError, match="train.steps"), engine.run_directory(bad, tmp_path / "run", "x"):
    pass
  assert not (tmp_path / "run").exists()
  with engine.run_directory(cfg, tmp_path / "run", "training") as (saved, running, workdir):
    assert saved == cfg and running.data.root == str(workdir / "data")
    assert [p.name for p in workdir.iterdir()] == [".lock"]  # held, nothing else written yet
  assert not workdir.exists()  # a run that wrote nothing leaves nothing
  with engine.run_directory(cfg, tmp_path / "run", "training") as (saved, _, workdir):
    engine.write_config(workdir, saved)
  assert json.loads((workdir / "config.json").read_text())["data"]["root"] == ""


def test_a_failed_asynchronous_save_stops_the_run_at_the_next_boundary(tmp_path, monkeypatch):
  """A disk that fills DURING an asynchronous save (after the free-space check) is reported as the OSError
  it is at the next logged unit, instead of training on without checkpoints."""
  import errno

  import orbax.checkpoint as ocp

  def failed(manager):
    if manager.latest_step() is not None:  # once a save has been started
      raise ValueError("RESOURCE_EXHAUSTED: write failed: No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", failed)
  toy = Toy()
  with pytest.raises(OSError) as raised:
    run(tmp_path, toy)
  assert raised.value.errno == errno.ENOSPC and "checkpoints" in str(raised.value.filename)
  assert toy.progress["seen"] == 3  # unit 2 saved, unit 3 ran, its boundary raised


def test_several_units_per_call_end_at_every_boundary_and_resume_with_another_count(tmp_path):
  """per_dispatch units per call, cut at log / checkpoint boundaries and at the end; the same result as one
  unit per call, also when a run resumes with another per_dispatch (train.steps_per_dispatch is resumable)."""
  stage = dataclasses.replace(STAGE, total=10, log_every=4, checkpoint_every=6, per_dispatch=3)
  toy = Toy()
  state, _, history = run(tmp_path / "a", toy, stage)
  assert toy.calls == [(0, 3), (3, 1), (4, 2), (6, 2), (8, 2)]
  assert [u for u, _ in history] == [4, 6, 8, 10]
  one, _, _ = run(tmp_path / "b", Toy(), dataclasses.replace(stage, per_dispatch=1))
  assert float(one["x"]) == float(state["x"])

  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "c", Toy(interrupt_at=7), dataclasses.replace(stage, per_dispatch=1))
  resumed_toy = Toy()
  resumed, _, _ = run(tmp_path / "c", resumed_toy, dataclasses.replace(stage, per_dispatch=4))
  assert resumed_toy.calls == [(6, 2), (8, 2)]  # from the checkpoint at 6, cut at the log boundary 8
  assert float(resumed["x"]) == float(state["x"])


def test_a_run_saved_by_an_older_version_resumes(tmp_path):
  """config.json of a run written before image sizes were (H, W) and before the tile fields existed: not a
  change (the run resumes); a real change of the same field still is."""
  import json

  from efficientad_jax import config as config_lib
  from efficientad_jax.config import Config
  from efficientad_jax.training import engine

  saved = json.loads(config_lib.to_json(Config()))
  saved["model"]["image_size"] = 256  # the old form
  del saved["model"]["tile"], saved["model"]["tile_overlap"]  # fields added since
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  assert engine.config_changes(tmp_path, Config()) == {}
  with pytest.raises(config_lib.ConfigError, match=r"model.image_size: \(256, 256\) -> \(128, 128\)"):
    engine.config_changes(tmp_path, config_lib.override(Config(), ["model.image_size=128"]))
