"""The members trainer (efficientad_jax/efficientad/members_trainer.py) on the tiny synthetic config: a group of two
equals its members trained alone, writes ordinary runs, drops a diverging member and goes on, and resumes members
at different steps exactly.

Bounds, measured on this CPU (2 members x 4 steps, seeds 0 and 1, random teachers): losses at every step within
relative 1e-4 of the solo runs, every parameter within 2e-5 absolute (tests/test_members.py's bounds: the grouped
kernels sum in another order), the map quantiles and the threshold within relative 1e-3.

The runs share one jitted step per program (`shared`): a new `jax.jit` per run would compile the same program
again, and compiles are most of these tests' time.
"""

import dataclasses
import json
import logging
import shutil

import jax
import numpy as np
import pytest

from efficientad_jax import config as config_lib
from efficientad_jax.efficientad import members, members_trainer, trainer
from efficientad_jax.serving import saved_model
from efficientad_jax.training import checkpoint, engine
from tests.test_trainer import tiny

SEEDS = {"a": 0, "b": 1}  # category -> seed of the two members


def configs():
  return [tiny(**{"data.category": c, "train.seed": s}) for c, s in SEEDS.items()]


def _params(model_dir):
  model = saved_model.load(model_dir)
  return jax.tree_util.tree_leaves(model.detector.params), model.detector.quantiles, model.meta


def _program(cfg):
  """What a compiled step depends on: the config without the fields its members differ in."""
  return dataclasses.replace(
    cfg, data=dataclasses.replace(cfg.data, root="", category=""), train=dataclasses.replace(cfg.train, seed=0)
  )


@pytest.fixture(scope="module")
def shared():
  """trainer.pieces and members.compile_group_step built once per program for the whole module; every
  engine.check_finite call recorded as (where, losses), the per-step losses of solo runs and members."""
  built, losses = {}, []
  make_pieces, make_step, check = trainer.pieces, members.compile_group_step, engine.check_finite

  def pieces(cfg, mesh):
    key = ("pieces", _program(cfg), mesh)
    if key not in built:
      built[key] = make_pieces(cfg, mesh)
    return built[key]

  def group_step(nets, cfg, tx, mesh, teacher_axis):
    key = ("group", _program(cfg), mesh, teacher_axis)
    if key not in built:
      built[key] = make_step(nets, cfg, tx, mesh, teacher_axis)
    return built[key]

  def recorded(values, where):
    losses.append((where, dict(values)))
    check(values, where)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "pieces", pieces)
    mp.setattr(members, "compile_group_step", group_step)
    mp.setattr(engine, "check_finite", recorded)
    yield losses


def _steps(losses, prefix):
  """{step: losses} of the records whose `where` starts with prefix."""
  return {int(where.rsplit(" ", 1)[1]): v for where, v in losses if where.startswith(prefix)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared):
  """The two configs trained alone (trainer.train) and as one group; the losses of each."""
  root = tmp_path_factory.mktemp("members")
  solo = {}
  for c, cfg in zip(SEEDS, configs()):
    start = len(shared)
    trainer.train(cfg, root / "solo" / c, progress=False)
    solo[c] = _steps(shared[start:], "training step")
  start = len(shared)
  results = members_trainer.train_members(configs(), [root / "group" / c for c in SEEDS], progress=False)
  group = {c: _steps(shared[start:], f"member {i + 1}/2 {c} S seed {SEEDS[c]} step") for i, c in enumerate(SEEDS)}
  return root, results, solo, group


def test_a_group_equals_its_members_trained_alone(trained):
  root, results, solo, group = trained
  assert [(r.model, r.error) for r in results] == [(root / "group" / c / "model", None) for c in SEEDS]
  for c in SEEDS:
    assert sorted(solo[c]) == sorted(group[c]) == [1, 2, 3, 4], c
    for step, values in solo[c].items():
      for name, value in values.items():
        assert group[c][step][name] == pytest.approx(value, rel=1e-4, abs=1e-7), (c, step, name)
    alone, q_alone, meta_alone = _params(root / "solo" / c / "model")
    ours, q_ours, meta_ours = _params(root / "group" / c / "model")
    for a, b in zip(alone, ours):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5)
    for k in ("st_start", "st_end", "ae_start", "ae_end"):
      assert float(getattr(q_ours, k)) == pytest.approx(float(getattr(q_alone, k)), rel=1e-3), (c, k)
    assert meta_ours["threshold"] == pytest.approx(meta_alone["threshold"], rel=1e-3)
    assert meta_ours["config"] == meta_alone["config"] and meta_ours["teacher"] == "random"
  # The two members did learn different things (the checks above are not trivially true).
  a, b = (np.asarray(_params(root / "group" / c / "model")[0][-1]) for c in SEEDS)
  assert float(np.abs(a - b).max()) > 1e-3


def _layout(run):
  """A run directory's files and folders to three levels (orbax's own file names below), without the generated
  synthetic data and TensorBoard's host-named event files."""
  found = (p.relative_to(run) for p in run.rglob("*"))
  return sorted(str(p) for p in found if len(p.parts) <= 3 and p.parts[0] not in ("data", "tensorboard"))


def test_members_write_ordinary_run_directories(trained):
  root, *_ = trained
  for c in SEEDS:
    alone, ours = root / "solo" / c, root / "group" / c
    assert json.loads((ours / "config.json").read_text()) == json.loads((alone / "config.json").read_text())
    assert _layout(ours) == _layout(alone)
    # The same split: the same images (inside each run's own synthetic data folder), the same counts and seed.
    alone_split, our_split = (json.loads((run / "splits.json").read_text()) for run in (alone, ours))
    for key, value in alone_split.items():
      if key in ("train", "validation"):
        assert [f.replace(str(alone), str(ours)) for f in value] == our_split[key]
      else:
        assert our_split[key] == value, key


def test_the_solo_trainer_resumes_a_members_checkpoint(trained, tmp_path):
  """A member's checkpoint is a solo run's: trainer.train finishes it (steps 3-4 alone) to the group's model."""
  root, *_ = trained
  run = tmp_path / "a"
  (run / "checkpoints").mkdir(parents=True)
  shutil.copy(root / "group" / "a" / "config.json", run / "config.json")
  shutil.copytree(root / "group" / "a" / "checkpoints" / "2", run / "checkpoints" / "2")
  resumed, *_ = _params(trainer.train(configs()[0], run, progress=False))
  for x, y in zip(_params(root / "group" / "a" / "model")[0], resumed):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=2e-5)


def test_members_resumed_at_different_steps_continue_exactly(trained, tmp_path):
  """Member b resumes at its checkpoint 2 while member a starts afresh: b waits (masked) for two steps, then both
  take steps 3-4 in the same program as the uninterrupted group, so both models equal the group's bit for bit."""
  root, *_ = trained
  (tmp_path / "b" / "checkpoints").mkdir(parents=True)
  shutil.copy(root / "group" / "b" / "config.json", tmp_path / "b" / "config.json")
  shutil.copytree(root / "group" / "b" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
  results = members_trainer.train_members(configs(), [tmp_path / c for c in SEEDS], progress=False)
  assert [r.error for r in results] == [None, None]
  for c in SEEDS:
    for x, y in zip(_params(root / "group" / c / "model")[0], _params(tmp_path / c / "model")[0]):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_a_diverging_member_stops_alone(trained, tmp_path, monkeypatch, caplog):
  """Member b's parameters are poisoned with NaN before its 3rd step: it stops at step 3 with its own one-line
  error, its checkpoint 2 kept and no model; member a goes on alone to its model (steps 1-3 in the group's
  program, step 4 in a group of one)."""
  root, *_ = trained
  make = members.compile_group_step

  def poisoned(*args):
    step = make(*args)

    def run(states, *rest):
      if states.step.shape[0] == 2 and int(states.step[1]) == 2:
        nan = lambda x: x.at[1].set(np.nan) if np.issubdtype(x.dtype, np.floating) else x
        states = states.replace(params=jax.tree_util.tree_map(nan, states.params))
      return step(states, *rest)

    return run

  monkeypatch.setattr(members, "compile_group_step", poisoned)
  with caplog.at_level(logging.INFO, logger="efficientad_jax"):
    a, b = members_trainer.train_members(configs(), [tmp_path / c for c in SEEDS], progress=False)
  assert a.error is None and a.model == tmp_path / "a" / "model"
  assert isinstance(b.error, engine.TrainingDiverged) and b.model is None
  assert str(b.error).startswith("member 2/2 b S seed 1 step 3: non-finite loss") and "\n" not in str(b.error)
  messages = [r.getMessage() for r in caplog.records if r.name == "efficientad_jax"]
  assert [m.split(":")[0] for m in messages if "failed" in m] == ["member 2/2 b S seed 1 failed"]
  assert "member 1/2 a S seed 0: step 4/4 loss" in "\n".join(messages)  # a went on
  assert checkpoint.TrainCheckpoints(tmp_path / "b" / "checkpoints", 2).all_steps() == [2]
  assert not (tmp_path / "b" / "model").exists()
  for x, y in zip(_params(root / "group" / "a" / "model")[0], _params(a.model)[0]):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=2e-5)


def test_members_must_differ_only_in_category_root_and_seed(tmp_path):
  a, b = configs()
  with pytest.raises(config_lib.ConfigError, match=r"member 2 has model.size='medium', member 1 'small'"):
    members_trainer.check_group([a, config_lib.override(b, ["model.size=medium"])], [tmp_path / "a", tmp_path / "b"])
  with pytest.raises(config_lib.ConfigError, match="given twice"):
    members_trainer.check_group([a, b], [tmp_path / "a", tmp_path / "x" / ".." / "a"])
  members_trainer.check_group([a, config_lib.override(b, ["data.root=/x"])], [tmp_path / "a", tmp_path / "b"])


def test_auto_members_from_the_compiled_steps(trained, caplog):
  """XLA's memory analysis of the group step for 1 and 2 members (both compiled by the tests above: lowering
  the same shapes again reuses them), extrapolated; on a CPU backend without a limit, 1."""
  cfg = configs()[0]
  one, two = members.group_step_bytes(cfg, 1), members.group_step_bytes(cfg, 2)
  assert two > one > 0
  limit = 8 * two
  fit = members.members_that_fit(one, two, limit, members.AUTO_MARGIN)
  assert members.auto_members(cfg, limit=limit) == fit > 4
  members._cpu_note.cache_clear()
  with caplog.at_level(logging.INFO, logger="efficientad_jax"):
    assert members.auto_members(cfg) == members.auto_members(cfg) == 1
  assert sum("on a CPU backend: 1 member" in r.getMessage() for r in caplog.records) == 1
