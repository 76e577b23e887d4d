"""Training speed for `experiments.benchmark --mode train | conv`: EfficientAD's own engine pieces
(`trainer.pieces`: networks, optimizer, the jitted data-parallel step, the state factory) fed by the real
data pipeline, or by random batches per conv backward implementation (`ModelConfig.conv_impl`)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from efficientad_jax import models, normalization, parallel, trainer, train_step
from efficientad_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from efficientad_jax.data import make_datasets
from efficientad_jax.models import conv as conv_lib

CONV_IMPLS = ("xla", "im2col", "shifted", "mixed")  # every backward a model can train with ("auto" picks one)


def summarize(seconds: list[float]) -> dict:
  """Mean and percentiles in milliseconds."""
  ms = 1e3 * np.asarray(seconds)
  return {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
          "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
          "min_ms": float(ms.min()), "runs": int(ms.size)}


def synthetic_data_config(image_size: int, root: str) -> DataConfig:
  """The synthetic dataset at the network size, with its own training images as the penalty folder (the
  real runs read ImageNet there: the pipeline does the same decoding, resizing and cropping work)."""
  data = DataConfig(dataset="synthetic", root=root, synthetic_size=image_size, synthetic_train=16)
  return dataclasses.replace(data, penalty=str(pathlib.Path(root) / "widget" / "train" / "good"))


def engine_step(cfg: Config, seed: int) -> tuple[Callable, list, jax.sharding.Mesh]:
  """(fn(state, frozen, sharded batch) -> (state, losses), [state, frozen], mesh): the trainer's own pieces on
  the trainer's mesh, a random teacher with identity statistics (the step's cost does not depend on them)."""
  mesh = parallel.data_mesh(parallel.data_parallel_devices(cfg.train.batch_size))
  method = trainer.pieces(cfg, mesh)
  key = jax.random.key(seed)
  teacher = models.init_params(method.nets, key, cfg.model.image_size)["teacher"]
  frozen = train_step.Frozen(teacher=teacher, stats=normalization.TeacherStats.identity(cfg.model.teacher_channels))
  holder = [parallel.new_state(method.init, key, mesh), parallel.replicate(frozen, mesh)]
  return (lambda state, frozen, batch: method.step(state, frozen, batch, key)), holder, mesh


def bench_train(cfg: ModelConfig, args: argparse.Namespace) -> dict:
  """Steps/s of the compiled train step fed by the real data pipeline, and the data-loading share.

  Each step is timed to completion (block on the losses), so data time and step time do not overlap:
  the data share is an upper bound of what the pipeline costs when steps run asynchronously.
  """
  root = tempfile.mkdtemp(prefix="efficientad_bench_")
  full = Config(model=cfg, data=synthetic_data_config(cfg.image_size, root),
                train=TrainConfig(steps=args.train_steps + args.train_warmup))
  generate = time.perf_counter()
  make_datasets(full.data, image_size=cfg.image_size, seed=0)  # generates the synthetic images once
  ds = make_datasets(full.data, image_size=cfg.image_size, seed=0)
  setup_s = time.perf_counter() - generate
  step, holder, mesh = engine_step(full, args.seed)
  it = ds.train_iter(full.train.batch_size)
  data_s, total_s = [], []
  compile_s = 0.0
  for i in range(args.train_warmup + args.train_steps):
    start = time.perf_counter()
    batch = parallel.shard_batch(next(it), mesh)
    loaded = time.perf_counter()
    holder[0], losses = step(holder[0], holder[1], batch)
    jax.block_until_ready(losses)
    end = time.perf_counter()
    if i < args.train_warmup:
      compile_s += end - start
      continue
    data_s.append(loaded - start)
    total_s.append(end - start)
  return {"size": cfg.size, "dtype": cfg.dtype, "image_size": cfg.image_size, "batch_size": full.train.batch_size,
          "conv_impl": conv_lib.resolve_impl(cfg.conv_impl), "steps": args.train_steps,
          "steps_per_s": len(total_s) / float(np.sum(total_s)), "step": summarize(total_s),
          "data_share": float(np.sum(data_s) / np.sum(total_s)), "data_ms_mean": 1e3 * float(np.mean(data_s)),
          "warmup_and_compile_s": compile_s, "dataset_setup_s": setup_s,
          "final_loss": float(losses["loss"]), "penalty": bool(ds.info["penalty"])}


def random_train_step_fn(size: str, image_size: int, seed: int = 0, impl: str = "auto"
                         ) -> Callable[[dict], float]:
  """fn(host batch {'image','image_ae','penalty'} [B, S, S, 3]) -> loss, one real compiled step per call,
  with the conv backward `impl` (ModelConfig.conv_impl)."""
  cfg = Config(model=ModelConfig(size=size, image_size=image_size, conv_impl=impl), train=TrainConfig(steps=10))
  step, holder, mesh = engine_step(cfg, seed)

  def run(batch: dict) -> float:
    holder[0], losses = step(holder[0], holder[1], parallel.shard_batch(batch, mesh))
    return float(losses["loss"])

  return run


def bench_conv(size: str, image_size: int, args: argparse.Namespace) -> dict:
  """Train-step seconds (batch 1, random data) per conv backward implementation, interleaved run by run so
  that a shared machine's load hits all of them alike. "xla" is the plain path (before)."""
  rng = np.random.default_rng(args.seed)
  batch = {k: rng.normal(size=(1, image_size, image_size, 3)).astype(np.float32)
           for k in ("image", "image_ae", "penalty")}
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
  return {"size": size, "image_size": image_size, "auto": conv_lib.resolve_impl("auto"),
          "compile_and_first_s": first,
          "median_step_s": {impl: float(np.median(s)) for impl, s in seconds.items()},
          "step_s": seconds}


def print_train(results: list[dict], env: dict) -> None:
  print(f"\nTraining, compiled step + data pipeline ({env['device']}, jax {env['jax_version']}, "
        f"{env['date']})")
  print("| model | dtype | image | conv | steps/s | step ms (p50) | data share |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['size']} | {r['dtype']} | {r['image_size']} | {r['conv_impl']} | {r['steps_per_s']:.3f} | "
          f"{r['step']['p50_ms']:.1f} | {100 * r['data_share']:.1f} % |")


def print_conv(results: list[dict], env: dict) -> None:
  print(f"\nTrain step by conv backward, median s ({env['device']}, jax {env['jax_version']}, {env['date']})")
  impls = list(results[0]["median_step_s"]) if results else []
  print("| model | image | " + " | ".join(impls) + " | auto = |")
  print("|---|---|" + "---|" * len(impls) + "---|")
  for r in results:
    m = r["median_step_s"]
    print(f"| {r['size']} | {r['image_size']} | " + " | ".join(f"{m[i]:.3f}" for i in impls) + f" | {r['auto']} |")


