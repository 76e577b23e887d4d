"""The training run end to end on the tiny synthetic config: model contents, exact resume after SIGKILL,
divergence handling, and two real jax.distributed processes."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientad_jax import config as config_lib
from efficientad_jax.efficientad import trainer
from efficientad_jax.serving import saved_model
from efficientad_jax.training import checkpoint, engine, optim, parallel
from experiments.train import load_config
from tests.conftest import REPO, count_compiles, devices_env, jax_cache_env


def tiny(**overrides):
  cfg = load_config("synthetic", "small,tiny", None)
  return config_lib.override(cfg, [f"{k}={v}" for k, v in overrides.items()])


def _train_cmd(workdir, *sets):
  args = [sys.executable, "-m", "experiments.train", "--size", "small,tiny", "--workdir", str(workdir), "--no-eval"]
  for s in sets:
    args += ["--set", s]
  return args


def _params(model_dir):
  model = saved_model.load(model_dir)
  return jax.tree_util.tree_leaves(model.detector.params), model.meta


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One tiny training run (the synthetic tiny config as it is) shared by the tests that only read it."""
  run = tmp_path_factory.mktemp("tiny") / "run"
  return run, trainer.train(tiny(), run, progress=False)


def test_a_later_run_initialises_its_state_without_compiling(tiny_run):
  """The networks' initialisation is compiled once per process (`models.init_params`), so a second run of the
  same config (a sweep's, this session's) builds its fresh state without an XLA compilation."""
  cfg = tiny()
  mesh = parallel.data_mesh(jax.devices()[:1])
  method = trainer.pieces(cfg, mesh)  # new objects, as a new run builds them
  with count_compiles(None) as compiled:
    state = jax.block_until_ready(parallel.new_state(method.init, jax.random.key(cfg.train.seed), mesh))
  assert not compiled, f"compiled {compiled} for a config this process has initialised before"
  leaves = jax.tree_util.tree_leaves(state)
  assert leaves and all(x.sharding == parallel.sharding(mesh, "r") for x in leaves)


def test_training_writes_a_complete_model(tiny_run):
  cfg = tiny()
  run, path = tiny_run
  model = saved_model.load(path)
  detector, meta = model.detector, model.meta
  assert model.method.name == meta["method"] == "efficientad"
  assert set(detector.params) == {"teacher", "student", "autoencoder"}
  assert detector.teacher_stats.mean.shape == (cfg.model.teacher_channels,)
  q = detector.quantiles
  assert float(q.st_end) > float(q.st_start) and float(q.ae_end) > float(q.ae_start)
  assert meta["penalty"] == "off" and meta["teacher"] == "random"
  assert meta["image_size"] == [64, 64] and meta["model_size"] == "small" and np.isfinite(meta["threshold"])
  saved = config_lib.from_dict(config_lib.Config, meta["config"])
  assert saved == cfg  # synthetic data live in the run (RUN/data), resolved at run time: a copy still works
  assert saved.data.root == "" and (run / "data").is_dir()
  assert (run / "config.json").exists()
  assert meta["global_batch"] == 1
  # RUN/splits.json lists the images of both splits, disjoint, as the data pipeline used them.
  splits = json.loads((run / "splits.json").read_text())
  assert splits["num_train"] == len(splits["train"]) == cfg.data.synthetic_train
  assert splits["num_validation"] == len(splits["validation"]) == cfg.data.synthetic_validation
  assert not set(splits["train"]) & set(splits["validation"])
  assert all(os.path.isfile(f) for f in splits["train"] + splits["validation"])
  # A restart with other settings must not silently continue this run.
  before = sorted(str(p) for p in run.rglob("*"))
  with pytest.raises(ValueError, match="different config"):
    trainer.train(tiny(**{"train.seed": 1}), run, progress=False)
  assert sorted(str(p) for p in run.rglob("*")) == before


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, jax_cache):
  sets = ["train.steps=8", "train.checkpoint_every=2"]
  # The three runs share the session's compilation cache: only the first compiles (the suite's wall time).
  # Cached, 3 s pass from checkpoint 4 to the saved model (measured under load 8 on 2 cores): ample to kill in.
  env = dict(os.environ, JAX_PLATFORMS="cpu", **jax_cache_env(jax_cache))
  subprocess.run(_train_cmd(tmp_path / "full", *sets), cwd=REPO, env=env, check=True, capture_output=True)

  proc = subprocess.Popen(
    _train_cmd(tmp_path / "killed", *sets), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpt_dir = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt_dir / "4").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # possibly in the middle of the next asynchronous save
  proc.wait()
  assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
  subprocess.run(_train_cmd(tmp_path / "killed", *sets), cwd=REPO, env=env, check=True, capture_output=True)

  full, meta_full = _params(tmp_path / "full" / "model")
  resumed, meta_resumed = _params(tmp_path / "killed" / "model")
  for a, b in zip(full, resumed):
    np.testing.assert_array_equal(a, b)
  assert meta_full["threshold"] == meta_resumed["threshold"]


def test_k_steps_per_call_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path, monkeypatch):
  """train.steps_per_dispatch = 2: a run directory holding only the uninterrupted run's config and its first
  checkpoint (what a run killed after it leaves) resumes to the uninterrupted run's parameters and threshold,
  bit for bit; every call is one K-step call. The resumed run calls the uninterrupted run's jitted step
  functions (`trainer.pieces` built once): a new process would compile the same programs, and the K-step
  program is the test's largest compile (the SIGKILL test above resumes in a new process)."""
  cfg = tiny(
    **{
      "train.steps": 4,
      "train.checkpoint_every": 2,
      "train.log_every": 2,
      "train.steps_per_dispatch": 2,
      "train.max_to_keep": 2,
    }
  )
  calls, built = [], {}
  make_pieces, make_advance = trainer.pieces, trainer.make_advance

  def shared_pieces(cfg, mesh):
    # The two runs' configs differ only in where the synthetic data live (engine.resolve_paths).
    key = (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="")), mesh)
    if key not in built:
      built[key] = make_pieces(cfg, mesh)
    return built[key]

  def recorded(*args):
    advance = make_advance(*args)
    return lambda state, frozen, first, count: (calls.append((first, count)), advance(state, frozen, first, count))[1]

  monkeypatch.setattr(trainer, "pieces", shared_pieces)
  monkeypatch.setattr(trainer, "make_advance", recorded)
  full, meta_full = _params(trainer.train(cfg, tmp_path / "full", progress=False))
  assert calls == [(0, 2), (2, 2)]
  stopped = tmp_path / "stopped"
  (stopped / "checkpoints").mkdir(parents=True)
  shutil.copy(tmp_path / "full" / "config.json", stopped / "config.json")
  shutil.copytree(tmp_path / "full" / "checkpoints" / "2", stopped / "checkpoints" / "2")
  resumed, meta_resumed = _params(trainer.train(cfg, stopped, progress=False))
  assert len(built) == 1
  assert calls[2:] == [(2, 2)]  # resumed at the checkpoint, the data stream at its saved position
  for a, b in zip(full, resumed):
    np.testing.assert_array_equal(a, b)
  assert meta_full["threshold"] == meta_resumed["threshold"]


def test_splits_json_records_the_seeded_hold_out(tmp_path):
  """MVTec AD layout: the reference's n - int(0.9 n) held-out images, listed by path, seeded by train.seed."""
  cfg = tiny(**{"data.synthetic_layout": "mvtec_ad", "data.synthetic_train": 12, "train.steps": 1})
  cfg = engine.resolve_paths(cfg, tmp_path / "a")
  trainer.write_splits(tmp_path / "a", trainer.checked_datasets(cfg), cfg)  # what train() writes, untrained
  splits = json.loads((tmp_path / "a" / "splits.json").read_text())
  assert len(splits["validation"]) == 12 - int(0.9 * 12) == 2 and len(splits["train"]) == 10
  assert not set(splits["train"]) & set(splits["validation"])
  assert all("/train/good/" in f for f in splits["train"] + splits["validation"])
  assert splits["seed"] == 0 and splits["validation_fraction"] == cfg.data.validation_fraction


_DEVICES = r"""
import sys, jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")  # as in the pytest process (conftest)
from efficientad_jax.efficientad import trainer
from efficientad_jax.serving import saved_model
from experiments import cli
cli.setup_logging()
from tests.test_trainer import tiny
path = trainer.train(tiny(), sys.argv[1], progress=False)
model = saved_model.load(path)
det, meta = model.detector, model.meta
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree_util.tree_leaves(det.params)])
print("DEVICES", jax.device_count(), "GLOBAL_BATCH", meta["global_batch"])
"""


def test_batch_one_on_eight_devices_trains_as_on_one(tmp_path, tiny_run, jax_cache):
  """The default global batch of 1 runs on one of 8 devices: the same parameters as the 1-device run."""
  env = dict(os.environ, **devices_env(8), **jax_cache_env(jax_cache))
  proc = subprocess.run(
    [sys.executable, "-c", _DEVICES, str(tmp_path / "run8"), str(tmp_path / "p8.npz")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "DEVICES 8 GLOBAL_BATCH 1" in proc.stdout
  assert "global batch 1 on 1 of 8 devices: 1 image(s) per device" in proc.stderr
  eight = np.load(tmp_path / "p8.npz")
  one, _ = _params(tiny_run[1])
  assert len(eight.files) == len(one) > 0
  # Same single-device mesh, same numbers up to float32 rounding: XLA:CPU with 8 simulated devices splits the
  # host's intra-op threads differently, which reorders some sums (BUILD_NOTES.md, "Test suite time").
  for i, a in enumerate(one):
    np.testing.assert_allclose(eight[f"arr_{i}"], np.asarray(a), rtol=0, atol=1e-6, err_msg=str(i))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  # From its third update on the optimizer explodes the parameters, so the losses of step 4 are NaN (a NaN
  # image would not do: XLA:CPU's fused conv+ReLU maps NaN inputs to 0).
  make = optim.make_optimizer

  def exploding(cfg, total_steps):
    blow_up = optax.scale_by_schedule(lambda count: jnp.where(count >= 2, 1e38, 1.0))
    return optax.chain(make(cfg, total_steps), blow_up)

  monkeypatch.setattr(optim, "make_optimizer", exploding)
  with pytest.raises(engine.TrainingDiverged, match="step 4: non-finite"):
    trainer.train(tiny(**{"train.steps": 6}), tmp_path / "run", progress=False)
  ckpts = checkpoint.TrainCheckpoints(tmp_path / "run" / "checkpoints", 2)
  assert ckpts.latest_step() == 2
  assert not (tmp_path / "run" / "model").exists()


_WORKER = r"""
import sys, jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from efficientad_jax.efficientad import trainer
from efficientad_jax.serving import saved_model
from tests.test_trainer import tiny
cfg = tiny(**{"train.steps": 3, "train.batch_size": 2})  # one image per process
path = trainer.train(cfg, sys.argv[3], progress=False)
det = saved_model.load(path).detector
leaves = jax.tree_util.tree_leaves(det.params)
print("CHECKSUM", repr(sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in leaves)))
"""


def test_two_processes_train_together_and_agree(tmp_path):
  import portpicker

  address = f"localhost:{portpicker.pick_unused_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, address, str(i), str(tmp_path / "run")],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  sums = [[l for l in out.splitlines() if l.startswith("CHECKSUM")] for out, _ in outs]
  assert sums[0] and sums[0] == sums[1]
