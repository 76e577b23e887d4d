"""Training speed for `experiments.benchmark --mode train | conv`: EfficientAD's own engine pieces
(`trainer.pieces`: networks, optimizer, the jitted data-parallel step, the state factory) fed by the real
data pipeline, or by random batches per conv backward implementation (`ModelConfig.conv_impl`)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from efficientad_jax import models
from efficientad_jax.config import CONV_IMPLS as MODEL_CONV_IMPLS
from efficientad_jax.config import Config, DataConfig, ImageSize, ModelConfig, TrainConfig
from efficientad_jax.data import make_datasets
from efficientad_jax.efficientad import normalization, train_step, trainer
from efficientad_jax.models import conv as conv_lib
from efficientad_jax.training import parallel

CONV_IMPLS = tuple(i for i in MODEL_CONV_IMPLS if i != "auto")  # every backward a model can train with


def summarize(seconds: list[float]) -> dict:
  """Mean and percentiles in milliseconds."""
  ms = 1e3 * np.asarray(seconds)
  return {
    "mean_ms": float(ms.mean()),
    "p50_ms": float(np.percentile(ms, 50)),
    "p90_ms": float(np.percentile(ms, 90)),
    "p99_ms": float(np.percentile(ms, 99)),
    "min_ms": float(ms.min()),
    "runs": int(ms.size),
  }


def synthetic_data_config(image_size: int, root: str) -> DataConfig:
  """The synthetic dataset at the network size, with its own training images as the penalty folder (the
  real runs read ImageNet there: the pipeline does the same decoding, resizing and cropping work)."""
  data = DataConfig(dataset="synthetic", root=root, synthetic_size=image_size, synthetic_train=16)
  return dataclasses.replace(data, penalty=str(pathlib.Path(root) / "widget" / "train" / "good"))


def engine_step(
  cfg: Config, seed: int, devices: list[jax.Device] | None = None
) -> tuple[trainer.Pieces, list, jax.sharding.Mesh]:
  """(the trainer's pieces, [state, frozen], mesh) on the trainer's mesh (over `devices`, default all), with a
  random teacher and identity statistics (the step's cost does not depend on them)."""
  mesh = parallel.data_mesh(parallel.data_parallel_devices(cfg.train.batch_size, devices))
  method = trainer.pieces(cfg, mesh)
  key = jax.random.key(seed)
  teacher = models.init_params(method.nets, key, cfg.model.network_size)["teacher"]
  frozen = train_step.Frozen(teacher=teacher, stats=normalization.TeacherStats.identity(cfg.model.teacher_channels))
  holder = [parallel.new_state(method.init, key, mesh), parallel.replicate(frozen, mesh)]
  return method, holder, mesh


def bench_train(cfg: ModelConfig, per_dispatch: int, args: argparse.Namespace) -> dict:
  """Steps/s of the trainer's loop body (`trainer.make_advance`: K batches of the real data pipeline stacked,
  copied and run as one call of the compiled step), with K = `per_dispatch` steps per call.

  Calls run asynchronously, as in training: the clock stops when the last call's losses are on the host.
  `host_ms_per_step` is the host's own time per step (reading, stacking and copying batches, dispatch), which
  overlaps the device's work.
  """
  dispatches = max(1, -(-args.train_steps // per_dispatch))
  with tempfile.TemporaryDirectory(prefix="efficientad_bench_") as root:
    full = Config(
      model=cfg,
      data=synthetic_data_config(max(cfg.image_size), root),  # square images, resized to H x W
      train=TrainConfig(steps=(dispatches + args.train_warmup) * per_dispatch, steps_per_dispatch=per_dispatch),
    )
    generate = time.perf_counter()
    ds = make_datasets(full.data, image_size=cfg.image_size, seed=0, training=True)
    setup_s = time.perf_counter() - generate
    method, holder, mesh = engine_step(full, args.seed)
    advance = trainer.make_advance(method, iter(ds.train_iter(full.train.batch_size)), mesh, jax.random.key(args.seed))
    start = time.perf_counter()
    for _ in range(args.train_warmup):
      holder[0], _ = advance(holder[0], holder[1], 0, per_dispatch)
    jax.block_until_ready(holder[0])
    compile_s = time.perf_counter() - start
    host_s = 0.0
    start = time.perf_counter()
    for _ in range(dispatches):
      called = time.perf_counter()
      holder[0], losses = advance(holder[0], holder[1], 0, per_dispatch)
      host_s += time.perf_counter() - called
    final_loss = float(losses["loss"])
    wall_s = time.perf_counter() - start
  steps = dispatches * per_dispatch
  return {
    "size": cfg.size,
    "dtype": cfg.dtype,
    "image_size": list(cfg.image_size),
    "batch_size": full.train.batch_size,
    "steps_per_dispatch": per_dispatch,
    "conv_impl": conv_lib.resolve_impl(cfg.conv_impl),
    "steps": steps,
    "steps_per_s": steps / wall_s,
    "ms_per_step": 1e3 * wall_s / steps,
    "host_ms_per_step": 1e3 * host_s / steps,
    "warmup_and_compile_s": compile_s,
    "dataset_setup_s": setup_s,
    "final_loss": final_loss,
    "penalty": bool(ds.info.penalty),
  }


def random_train_step_fn(size: str, image_size: int, seed: int = 0, impl: str = "auto") -> Callable[[dict], float]:
  """fn(host batch {'image','image_ae','penalty'} [B, S, S, 3]) -> loss, one real compiled step per call,
  with the conv backward `impl` (ModelConfig.conv_impl)."""
  cfg = Config(model=ModelConfig(size=size, image_size=image_size, conv_impl=impl), train=TrainConfig(steps=10))
  method, holder, mesh = engine_step(cfg, seed)
  key = jax.random.key(seed)

  def run(batch: dict) -> float:
    holder[0], losses = method.step(holder[0], holder[1], parallel.shard_batch(batch, mesh), key)
    return float(losses["loss"])

  return run


def bench_conv(size: str, image_size: int, args: argparse.Namespace) -> dict:
  """Train-step seconds (batch 1, random data) per conv backward implementation, interleaved run by run so
  that a shared machine's load hits all of them alike. "xla" is the plain path (before)."""
  rng = np.random.default_rng(args.seed)
  batch = {
    k: rng.normal(size=(1, *ImageSize(image_size), 3)).astype(np.float32) for k in ("image", "image_ae", "penalty")
  }
  impls = args.conv_impls
  steps = {impl: random_train_step_fn(size, image_size, args.seed, impl) for impl in impls}
  first = {}
  for impl in impls:
    start = time.perf_counter()
    steps[impl](batch)
    first[impl] = time.perf_counter() - start
  seconds = {impl: [] for impl in impls}
  for _ in range(args.conv_runs):
    for impl in impls:
      start = time.perf_counter()
      steps[impl](batch)
      seconds[impl].append(time.perf_counter() - start)
  return {
    "size": size,
    "image_size": list(ImageSize(image_size)),
    "auto": conv_lib.resolve_impl("auto"),
    "compile_and_first_s": first,
    "median_step_s": {impl: float(np.median(s)) for impl, s in seconds.items()},
    "step_s": seconds,
  }


def print_train(results: list[dict], env: dict) -> None:
  print(f"\nTraining, compiled step + data pipeline ({env['device']}, jax {env['jax_version']}, {env['date']})")
  print("| model | dtype | image | conv | steps per call | steps/s | ms per step | host ms per step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['size']} | {r['dtype']} | {ImageSize(r['image_size'])} | {r['conv_impl']} | {r['steps_per_dispatch']} | "
      f"{r['steps_per_s']:.3f} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.3f} |"
    )


def print_conv(results: list[dict], env: dict) -> None:
  print(f"\nTrain step by conv backward, median s ({env['device']}, jax {env['jax_version']}, {env['date']})")
  impls = list(results[0]["median_step_s"]) if results else []
  print("| model | image | " + " | ".join(impls) + " | auto = |")
  print("|---|---|" + "---|" * len(impls) + "---|")
  for r in results:
    m = r["median_step_s"]
    times = " | ".join(f"{m[i]:.3f}" for i in impls)
    print(f"| {r['size']} | {ImageSize(r['image_size'])} | {times} | {r['auto']} |")
