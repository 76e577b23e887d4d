"""`experiments.benchmark --mode accelerator`: the one command to run first on any new accelerator (README,
"Benchmark"), a few minutes: every figure the project needs from a device, in one JSON and one table.

  1. the paper's latency and throughput protocol (`bench_inference`) for PDN-S and PDN-M in float32 and bfloat16;
  2. training steps/s of the trainer's loop body at 1 and 64 steps per call (`bench_train`, the real data stream);
  3. a short training run on the device and the same run on the host CPU, from the same initial state on the same
     batches: the loss curves side by side and their largest relative difference (a device whose kernels
     diverge from the CPU's shows here, before a 70,000-step run does);
  4. the ONNX graph under onnxruntime's CUDA provider where that provider is installed (else said so), against
     the JAX predict.

`--tiny` shrinks every part (64², PDN-S, float32, a few runs): the test suite runs it on a CPU, where the
"device" is the CPU itself, so the command is known to work before a device is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import jax
import numpy as np

from efficientad_jax.config import Config, ModelConfig, TrainConfig
from efficientad_jax.data import make_datasets
from experiments import benchmark_train

CURVE_STEPS = {False: 20, True: 3}  # the short training run (tiny: 3 steps)


def loss_curve(cfg: Config, device: jax.Device, batches: list[dict], seed: int) -> list[float]:
  """Total loss per step of the trainer's compiled step on `device`, from the seeded initial state."""
  with jax.default_device(device):
    method, holder, mesh = benchmark_train.engine_step(cfg, seed, devices=[device])
    key = jax.random.key(seed)
    losses = []
    for batch in batches:
      holder[0], out = method.step(holder[0], holder[1], benchmark_train.parallel.shard_batch(batch, mesh), key)
      losses.append(float(out["loss"]))
  return losses


def compare_curves(args: argparse.Namespace) -> dict:
  steps = CURVE_STEPS[args.tiny]
  with tempfile.TemporaryDirectory(prefix="efficientad_curve_") as root:
    size = max(args.image_size)
    cfg = Config(
      model=ModelConfig(size="small", image_size=args.image_size),
      data=dataclasses.replace(benchmark_train.synthetic_data_config(size, root), num_workers=0),
      train=TrainConfig(steps=steps),
    )
    stream = make_datasets(cfg.data, image_size=cfg.model.image_size, seed=args.seed, training=True).train_iter(1)
    batches = [next(stream) for _ in range(steps)]
    stream.close()
    device, host = jax.devices()[0], jax.devices("cpu")[0]
    start = time.perf_counter()
    on_device = loss_curve(cfg, device, batches, args.seed)
    device_s = time.perf_counter() - start
    # On a CPU-only machine the device is the host: the same run twice would compare nothing.
    on_host = on_device if device.platform == "cpu" else loss_curve(cfg, host, batches, args.seed)
  rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(on_device, on_host)]
  return {
    "steps": steps,
    "device": device.device_kind,
    "device_losses": on_device,
    "cpu_losses": on_host,
    "max_relative_difference": float(max(rel)),
    "compared": device.platform != "cpu",
    "device_seconds": device_s,
  }


def onnx_on_cuda(args: argparse.Namespace) -> dict:
  """The ONNX graph of a random-parameter PDN-S under onnxruntime's CUDA provider, against the JAX predict."""
  try:
    import onnxruntime as ort
  except ImportError:
    return {"available": False, "why": "onnxruntime is not installed (pip extra 'deploy')"}
  if "CUDAExecutionProvider" not in ort.get_available_providers():
    return {
      "available": False,
      "why": f"onnxruntime has no CUDA provider here ({', '.join(ort.get_available_providers())})",
    }
  from efficientad_jax.serving import onnx_graph
  from experiments import benchmark_deploy

  with tempfile.TemporaryDirectory(prefix="efficientad_onnx_") as folder:
    model = benchmark_deploy.random_model("small", args.image_size, pathlib.Path(folder), args.seed)
    session = ort.InferenceSession(
      onnx_graph.to_onnx(model).SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    images = np.random.default_rng(args.seed).normal(size=(2, *args.image_size, 3)).astype(np.float32)
    (amap,) = session.run(["anomaly_map"], {"image": images})
    ref = np.asarray(model.predict_fn(model.detector, images, out_size=tuple(args.image_size))["anomaly_map"])
    start = time.perf_counter()
    for _ in range(args.runs):
      session.run(["anomaly_map"], {"image": images[:1]})
    return {
      "available": True,
      "providers": session.get_providers(),
      "max_abs_difference": float(np.abs(amap - ref).max()),
      "batch1_ms": 1e3 * (time.perf_counter() - start) / max(args.runs, 1),
    }


def bench_accelerator(args: argparse.Namespace, inference, train) -> dict:
  """All four parts; `inference` and `train` are the benchmark's own functions (experiments/benchmark.py)."""
  start = time.perf_counter()
  report = {"inference": inference(args), "train": train(args), "loss_curve": compare_curves(args)}
  report["onnx_cuda"] = onnx_on_cuda(args)
  report["wall_seconds"] = time.perf_counter() - start
  return report


def print_accelerator(report: dict, env: dict) -> None:
  print(f"\naccelerator check: {env['device']} ({env['platform']}), jax {env['jax_version']}, {env['date']}")
  print("| model | dtype | latency p50 ms | images/s (best batch) | paper ms / img/s |")
  print("|---|---|---|---|---|")
  for r in report["inference"]:
    paper = r.get("paper") or {}
    paper_text = f"{paper.get('latency_ms', '')} / {paper.get('throughput_img_s', '')}"
    print(
      f"| {r['size']} | {r['dtype']} | {r['latency']['p50_ms']:.2f} | {r['throughput']['images_per_s']:.1f} "
      f"(batch {r['throughput']['best_batch_size']}) | {paper_text} |"
    )
  for r in report["train"]:
    print(f"train {r['size']} {r['dtype']}, {r['steps_per_dispatch']} steps per call: {r['steps_per_s']:.2f} steps/s")
  c = report["loss_curve"]
  print(
    f"loss curve, {c['steps']} steps, device vs CPU: largest relative difference {c['max_relative_difference']:.2e}"
  )
  cuda = report["onnx_cuda"]
  print(
    "onnxruntime CUDA: "
    + (f"max |map difference| {cuda['max_abs_difference']:.2e}" if cuda["available"] else cuda["why"])
  )
  print(f"total {report['wall_seconds']:.0f} s")
