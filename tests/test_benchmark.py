"""experiments.benchmark --tiny runs end to end in every mode and writes the documented JSON (no timing
assertions: the numbers depend on the machine)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, jax_cache_env

ENV_KEYS = {"device", "platform", "jax_version", "date"}


@pytest.fixture
def run(tmp_path, jax_cache):
  """Runs `experiments.benchmark --tiny` in a subprocess with the session's compilation cache: the modes
  compile the same tiny train step and predict (the accelerator check compiles the train mode's step twice),
  and a cached executable is the same executable, so only the first compile of each program is paid."""
  return lambda *extra: _run(tmp_path, *extra, env={**os.environ, **jax_cache_env(jax_cache)})


def _run(tmp_path, *extra, env=None):
  out = tmp_path / "tmp.json"
  # faulthandler: a crash in native code (seen once in ~40 runs of the train mode: rc -11, empty output, not
  # reproduced since) then leaves the Python stack in stderr, which the assertion prints.
  cmd = [sys.executable, "-X", "faulthandler", "-m", "experiments.benchmark", "--tiny", "--out", str(out), *extra]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_inference_json_structure(run):
  report, stdout = run("--image-size", "64x96")  # a rectangular input (H x W)
  assert set(report["environment"]) >= ENV_KEYS
  assert report["mode"] == "inference" and report["tiny"] is True
  (result,) = report["results"]
  assert (result["size"], result["dtype"], result["image_size"]) == ("small", "float32", [64, 96])
  assert {"mean_ms", "p50_ms", "p90_ms", "p99_ms"} <= set(result["latency"])
  assert result["latency"]["runs"] == report["protocol"]["runs"]
  thr = result["throughput"]
  assert set(thr["per_batch"]) == {"1", "2"} and str(thr["best_batch_size"]) in thr["per_batch"]
  assert thr["images_per_s"] > 0
  assert result["paper"] == {"latency_ms": 2.2, "throughput_img_s": 614}
  assert "| small | float32 |" in stdout


def test_train_json_structure(run):
  """The trainer's loop body (`trainer.make_advance`) at one step per call; K > 1 goes through the same
  function (tested in test_trainer), and XLA:CPU runs K-step loops slowly (BUILD_NOTES.md)."""
  report, stdout = run("--mode", "train", "--dispatch", "1")
  assert report["mode"] == "train" and set(report["environment"]) >= ENV_KEYS
  (result,) = report["results"]
  assert result["steps_per_dispatch"] == 1 and result["steps"] == 3
  assert result["image_size"] == [64, 64] and result["penalty"] is True
  assert result["steps_per_s"] > 0 and 0 < result["host_ms_per_step"] <= result["ms_per_step"]
  assert result["conv_impl"] in ("xla", "im2col", "shifted", "mixed")
  assert "steps/s" in stdout


def test_feed_json_structure(run):
  """The stream before/after on generated MVTec-size inputs, the loop overhead per K, the predict overhead."""
  report, stdout = run("--mode", "feed")
  for key in ("feed_steps_per_s", "feed_steps_per_s_before"):
    assert report[key] > 0, key
  assert isinstance(report["loop_overhead_ms_per_step"], float)
  assert isinstance(report["predict_overhead_ms"], float) and report["predict"]["compute_ms"] > 0
  assert set(report["loop"]) == {"1", "4"}  # TINY's --feed-dispatch
  stream = report["stream"]
  assert stream["before"]["stream"] == "before" and stream["before"]["num_workers"] == 0
  assert stream["no_cache"]["decode_cache"] is False
  assert [r["decode_cache"] for r in stream["after"]] == [True]
  assert "| before (decode every use, float32 on the host) | 0 |" in stdout and "loop overhead" in stdout


def test_conv_mode_times_the_chosen_backwards(run):
  """Two of the four implementations (each is a train-step compile); the default times all four."""
  report, stdout = run("--mode", "conv", "--conv-impls", "xla,mixed")
  (result,) = report["results"]
  assert set(result["median_step_s"]) == {"xla", "mixed"}
  assert all(len(v) == 1 and v[0] > 0 for v in result["step_s"].values())
  assert "| small | 64 |" in stdout and "| xla | mixed |" in stdout
  from experiments import benchmark

  assert benchmark.parse_args(["--mode", "conv"]).conv_impls == ["xla", "im2col", "shifted", "mixed"]


def test_bad_arguments_fail_with_one_line(capsys):
  """The command line (one subprocess: the module's entry point), then the checks of `parse_args` in process."""
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.benchmark", "--mode", "nope"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0 and "invalid choice" in proc.stderr
  from experiments import benchmark

  for argv, flag in (
    (["--mode", "conv", "--conv-impls", "cudnn"], "--conv-impls"),
    (["--mode", "train", "--dispatch", "0"], "--dispatch"),
  ):
    with pytest.raises(SystemExit) as exit_:
      benchmark.parse_args(argv)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]


def test_members_json_structure(run):
  """N models in one program (--mode members): steps/s per member and the ratio to one model alone, memory."""
  report, stdout = run("--mode", "members", "--train-steps", "2", "--train-warmup", "1")
  assert report["mode"] == "members"
  assert [r["members"] for r in report["results"]] == [1, 2]
  solo, pair = report["results"]
  assert solo["ratio_to_solo"] == 1.0 and pair["ratio_to_solo"] > 0 and pair["steps_timed"] == 2
  assert pair["steps_per_s_per_member"] == pytest.approx(2 / (pair["median_step_ms"] / 1e3))
  assert solo["memory_per_member_mib"] > 0
  assert "steps/s per member" in stdout


def test_accelerator_check_runs_in_its_tiny_form(run):
  """The one command to run first on a new accelerator, reduced (--tiny) on this CPU: every part reports."""
  report, stdout = run("--mode", "accelerator", "--runs", "2", "--train-steps", "2", "--train-warmup", "1")
  assert report["mode"] == "accelerator" and set(report["environment"]) >= ENV_KEYS
  (inference,) = report["inference"]
  assert inference["size"] == "small" and inference["latency"]["runs"] == 2
  assert [r["steps_per_dispatch"] for r in report["train"]] == [1]
  curve = report["loss_curve"]
  assert len(curve["device_losses"]) == curve["steps"] and all(np.isfinite(curve["device_losses"]))
  assert curve["compared"] is False  # the device is the CPU here
  assert report["onnx_cuda"]["available"] is False and "CUDA" in report["onnx_cuda"]["why"]
  assert "accelerator check" in stdout and "loss curve" in stdout
