"""The training run end to end on the tiny synthetic config: model contents, exact resume after SIGKILL,
divergence handling, and two real jax.distributed processes."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientad_jax import checkpoint, config as config_lib, trainer, train_step
from experiments.train import load_config
from tests.conftest import REPO


def tiny(**overrides):
  cfg = load_config("synthetic", "small,tiny", None)
  return config_lib.override(cfg, [f"{k}={v}" for k, v in overrides.items()])


def _train_cmd(workdir, *sets):
  args = [sys.executable, "-m", "experiments.train", "--size", "small,tiny", "--workdir", str(workdir), "--no-eval"]
  for s in sets:
    args += ["--set", s]
  return args


def _params(model_dir):
  detector, meta = checkpoint.load_model(model_dir)
  return jax.tree_util.tree_leaves(detector.params), meta


def test_training_writes_a_complete_model(tmp_path):
  cfg = tiny()
  path = trainer.train(cfg, tmp_path / "run", progress=False)
  detector, meta = checkpoint.load_model(path)
  assert set(detector.params) == {"teacher", "student", "autoencoder"}
  assert detector.teacher_stats.mean.shape == (cfg.model.teacher_channels,)
  q = detector.quantiles
  assert float(q.st_end) > float(q.st_start) and float(q.ae_end) > float(q.ae_start)
  assert meta["penalty"] == "off" and meta["teacher"] == "random"
  assert meta["image_size"] == 64 and meta["model_size"] == "small" and np.isfinite(meta["threshold"])
  saved = config_lib.from_dict(config_lib.Config, meta["config"])
  assert saved == trainer.resolve_paths(cfg, (tmp_path / "run").absolute())
  assert saved.data.root == str((tmp_path / "run" / "data").absolute())  # synthetic data live in the run
  assert (tmp_path / "run" / "config.json").exists()
  # A restart with other settings must not silently continue this run.
  with pytest.raises(ValueError, match="different config"):
    trainer.train(tiny(**{"train.seed": 1}), tmp_path / "run", progress=False)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
  sets = ["train.steps=8", "train.checkpoint_every=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(_train_cmd(tmp_path / "full", *sets), cwd=REPO, env=env, check=True, capture_output=True)

  proc = subprocess.Popen(_train_cmd(tmp_path / "killed", *sets), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  # From its third update on the optimizer explodes the parameters, so the losses of step 4 are NaN (a NaN
  # image would not do: XLA:CPU's fused conv+ReLU maps NaN inputs to 0).
  make = train_step.make_optimizer

  def exploding(cfg, total_steps):
    blow_up = optax.scale_by_schedule(lambda count: jnp.where(count >= 2, 1e38, 1.0))
    return optax.chain(make(cfg, total_steps), blow_up)

  monkeypatch.setattr(train_step, "make_optimizer", exploding)
  with pytest.raises(trainer.TrainingDiverged, match="step 4: non-finite"):
    trainer.train(tiny(**{"train.steps": 6}), tmp_path / "run", progress=False)
  ckpts = checkpoint.TrainCheckpoints(tmp_path / "run" / "checkpoints", 2)
  assert ckpts.latest_step() == 2
  assert not (tmp_path / "run" / "model").exists()


_WORKER = r"""
import sys, jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from efficientad_jax import trainer, checkpoint
from tests.test_trainer import tiny
path = trainer.train(tiny(**{"train.steps": 3}), sys.argv[3], progress=False)
det, _ = checkpoint.load_model(path)
print("CHECKSUM", repr(sum(float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree_util.tree_leaves(det.params))))
"""


def test_two_processes_train_together_and_agree(tmp_path):
  import portpicker
  address = f"localhost:{portpicker.pick_unused_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(tmp_path / "run")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  sums = [[l for l in out.splitlines() if l.startswith("CHECKSUM")] for out, _ in outs]
  assert sums[0] and sums[0] == sums[1]
