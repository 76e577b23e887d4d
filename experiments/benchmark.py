"""Latency, throughput and training speed of EfficientAD-JAX, next to the paper's numbers (paper §4; docs/method.md §10).

Inference times THE predict path (`inference.make_predict_fn`, no copy of the models) from host image to host
map, as in the paper's protocol: host->device copy, teacher, student, autoencoder, both maps and their
normalisation, resize to the image size, device->host copy of the anomaly map and score.

  python -m experiments.benchmark --sizes small,medium --dtypes float32,bfloat16,float16 \
      --batch-sizes 1,8,16,32,64 --out bench.json                     # random params, 1000+1000 runs
  python -m experiments.benchmark --model RUN/model --dtypes float16   # a saved model
  python -m experiments.benchmark --mode train --sizes small --train-steps 20   # real step + real data
  python -m experiments.benchmark --mode conv --sizes small              # conv backward per conv_impl
  python -m experiments.benchmark --tiny --out tmp.json                  # 64x64, few runs (CI)

The defaults (1000 warm-up + 1000 runs at 256x256) are meant for an accelerator; on a CPU one PDN-S image
takes on the order of a second, so pass e.g. `--warmup 3 --runs 20 --batch-sizes 1,4`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from efficientad_jax import backend, checkpoint, models, normalization, train_step
from efficientad_jax.config import Config, DataConfig, MapConfig, ModelConfig, TrainConfig, from_dict
from efficientad_jax.inference import Detector, make_predict_fn, make_raw_maps_fn
from efficientad_jax.models import conv as conv_lib
from experiments import cli

# docs/method.md §10 (paper §4): the paper's latency (batch 1, half precision) and throughput on an RTX A6000.
PAPER = {"small": {"latency_ms": 2.2, "throughput_img_s": 614},
         "medium": {"latency_ms": 4.5, "throughput_img_s": 269}}
TINY = {"image_size": 64, "warmup": 1, "runs": 3, "batch_sizes": "1,2", "throughput_runs": 2,
        "train_steps": 3, "train_warmup": 1, "conv_runs": 1}


def environment() -> dict:
  """Device, versions and date: a timing means nothing without them."""
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "host": platform.machine(), "jax_version": jax.__version__,
          "flax_version": flax.__version__, "date": datetime.date.today().isoformat(),
          "compiler_options": backend.compiler_options()}


def pdn_out(image_size: int, size: str) -> int:
  return models.pdn_output_size((image_size, image_size), size)[0]


def summarize(seconds: list[float]) -> dict:
  """Mean and percentiles in milliseconds."""
  ms = 1e3 * np.asarray(seconds)
  return {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
          "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
          "min_ms": float(ms.min()), "runs": int(ms.size)}


def time_calls(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
  """Wall seconds of `runs` calls after `warmup` calls; `fn` must return only when its result is on host."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


# --- Inference.

def plausible_detector(nets: models.Models, cfg: ModelConfig, key: jax.Array) -> Detector:
  """Random params with teacher statistics and map quantiles fitted on two random images, so the maps and
  their normalisation run on realistic magnitudes (no zeros or infinities)."""
  params = models.init_params(nets, key, cfg.image_size)
  images = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (2, cfg.image_size, cfg.image_size, 3)))
  feats = np.asarray(nets.teacher.apply({"params": params["teacher"]}, images), np.float32)
  stats = normalization.TeacherStats(mean=jnp.asarray(feats.mean(axis=(0, 1, 2))),
                                     std=jnp.asarray(feats.std(axis=(0, 1, 2)) + 1e-6))
  map_st, map_ae = make_raw_maps_fn(nets)(params, stats, images)
  quantiles = normalization.fit_map_quantiles(np.asarray(map_st), np.asarray(map_ae), 0.9, 0.995)
  return Detector(params=params, teacher_stats=stats, quantiles=quantiles)


def host_predict(nets: models.Models, map_cfg: MapConfig, detector: Detector,
                 out_size: tuple[int, int]) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """fn(host images [B, S, S, 3]) -> (host maps [B, *out_size], host scores [B]) via THE predict path."""
  predict = make_predict_fn(nets, map_cfg)
  device = jax.devices()[0]

  def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = predict(detector, jax.device_put(images, device), out_size=out_size)
    return np.asarray(out["anomaly_map"]), np.asarray(out["score"])

  return run


def host_predict_fn(size: str, dtype: str, image_size: int, seed: int = 0):
  """Random-parameter EfficientAD-`size` as fn(host images) -> (host maps, host scores)."""
  cfg = ModelConfig(size=size, dtype=dtype, image_size=image_size)
  nets = models.build(cfg)
  detector = plausible_detector(nets, cfg, jax.random.key(seed))
  return host_predict(nets, MapConfig(), detector, (image_size, image_size))


def bench_inference(cfg: ModelConfig, detector: Detector | None, args: argparse.Namespace) -> dict:
  """Latency (batch 1) and throughput (best of `--batch-sizes`) of one model size and dtype."""
  nets = models.build(cfg)
  if detector is None:
    detector = plausible_detector(nets, cfg, jax.random.key(args.seed))
  s = cfg.image_size
  run = host_predict(nets, MapConfig(), detector, (s, s))
  rng = np.random.default_rng(args.seed)
  one = rng.normal(size=(1, s, s, 3)).astype(np.float32)
  result = {"size": cfg.size, "dtype": cfg.dtype, "image_size": s,
            "latency": summarize(time_calls(lambda: run(one), args.warmup, args.runs))}
  per_batch = {}
  for b in args.batch_sizes:
    images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    seconds = time_calls(lambda: run(images), args.throughput_warmup, args.throughput_runs)
    median = float(np.median(seconds))
    per_batch[str(b)] = {"images_per_s": b / median, "median_batch_ms": 1e3 * median}
  best = max(per_batch, key=lambda k: per_batch[k]["images_per_s"])
  result["throughput"] = {"per_batch": per_batch, "best_batch_size": int(best),
                          "images_per_s": per_batch[best]["images_per_s"]}
  result["paper"] = PAPER.get(cfg.size)
  return result


def inference_configs(args: argparse.Namespace) -> list[tuple[ModelConfig, Detector | None]]:
  """(config, detector or None for random params) for every size x dtype asked for."""
  if args.model:
    path = pathlib.Path(args.model)
    path = path / "model" if (path / "model" / "meta").exists() else path
    detector, meta = checkpoint.load_model(path)
    if meta.get("method") == "efficientad_ast" or "model" not in meta.get("config", {}):
      raise ValueError(f"{path} is an EfficientAD-AST model (--model): the benchmark times the PDN models only; "
                       "pass an EfficientAD run, or drop --model to time random parameters")
    base = from_dict(ModelConfig, meta["config"]["model"])
    return [(dataclasses.replace(base, dtype=d), detector) for d in args.dtypes]
  return [(ModelConfig(size=s, dtype=d, image_size=args.image_size), None)
          for s in args.sizes for d in args.dtypes]


# --- Training.

def synthetic_data_config(image_size: int, root: str) -> DataConfig:
  """The synthetic dataset at the network size, with its own training images as the penalty folder (the
  real runs read ImageNet there: the pipeline does the same decoding, resizing and cropping work)."""
  data = DataConfig(dataset="synthetic", root=root, synthetic_size=image_size, synthetic_train=16)
  return dataclasses.replace(data, penalty=str(pathlib.Path(root) / "widget" / "train" / "good"))


def bench_train(cfg: ModelConfig, args: argparse.Namespace) -> dict:
  """Steps/s of the compiled train step fed by the real data pipeline, and the data-loading share.

  Each step is timed to completion (block on the losses), so data time and step time do not overlap:
  the data share is an upper bound of what the pipeline costs when steps run asynchronously.
  """
  root = tempfile.mkdtemp(prefix="efficientad_bench_")
  full = Config(model=cfg, data=synthetic_data_config(cfg.image_size, root),
                train=TrainConfig(steps=args.train_steps + args.train_warmup))
  from efficientad_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
  generate = time.perf_counter()
  make_datasets(full.data, image_size=cfg.image_size, seed=0)  # generates the synthetic images once
  ds = make_datasets(full.data, image_size=cfg.image_size, seed=0)
  setup_s = time.perf_counter() - generate
  nets = models.build(cfg)
  batch_size = full.train.batch_size
  mesh = train_step.data_mesh(train_step.data_parallel_devices(batch_size))
  tx = train_step.make_optimizer(full.optim, full.train.steps)
  params = models.init_params(nets, jax.random.key(args.seed), cfg.image_size)
  c = cfg.teacher_channels
  frozen = train_step.Frozen(teacher=params["teacher"],
                             stats=normalization.TeacherStats(jnp.zeros(c), jnp.ones(c)))
  state, frozen = train_step.replicate((train_step.init_state(params, tx), frozen), mesh)
  step_fn = train_step.compile_train_step(nets, full, tx, mesh)
  it = ds.train_iter(batch_size)
  key = jax.random.key(args.seed)
  data_s, total_s = [], []
  compile_s = 0.0
  for i in range(args.train_warmup + args.train_steps):
    start = time.perf_counter()
    batch = train_step.shard_batch(next(it), mesh)
    loaded = time.perf_counter()
    state, losses = step_fn(state, frozen, batch, key)
    jax.block_until_ready(losses)
    end = time.perf_counter()
    if i < args.train_warmup:
      compile_s += end - start
      continue
    data_s.append(loaded - start)
    total_s.append(end - start)
  return {"size": cfg.size, "dtype": cfg.dtype, "image_size": cfg.image_size, "batch_size": batch_size,
          "conv_impl": conv_lib.resolve_impl("auto"), "steps": args.train_steps,
          "steps_per_s": len(total_s) / float(np.sum(total_s)), "step": summarize(total_s),
          "data_share": float(np.sum(data_s) / np.sum(total_s)), "data_ms_mean": 1e3 * float(np.mean(data_s)),
          "warmup_and_compile_s": compile_s, "dataset_setup_s": setup_s,
          "final_loss": float(losses["loss"]), "penalty": bool(ds.info["penalty"])}


def random_train_step_fn(size: str, image_size: int, seed: int = 0,
                         impl: str | None = None) -> Callable[[dict], float]:
  """fn(host batch {'image','image_ae','penalty'} [B, S, S, 3]) -> loss, one real compiled step per call.

  `impl` forces the conv backward ("xla", "im2col", "shifted", "mixed") instead of "auto" (traced at the
  first call).
  """
  cfg = Config(model=ModelConfig(size=size, image_size=image_size), train=TrainConfig(steps=10))
  nets = models.build(cfg.model)
  mesh = train_step.data_mesh()
  tx = train_step.make_optimizer(cfg.optim, cfg.train.steps)
  params = models.init_params(nets, jax.random.key(seed), image_size)
  c = cfg.model.teacher_channels
  frozen = train_step.Frozen(teacher=params["teacher"],
                             stats=normalization.TeacherStats(jnp.zeros(c), jnp.ones(c)))
  holder = list(train_step.replicate((train_step.init_state(params, tx), frozen), mesh))
  step_fn = train_step.compile_train_step(nets, cfg, tx, mesh)
  key = jax.random.key(seed)

  def step(batch: dict) -> float:
    with conv_lib.override_auto(impl):
      holder[0], losses = step_fn(holder[0], holder[1], train_step.shard_batch(batch, mesh), key)
    return float(losses["loss"])

  return step


def bench_conv(size: str, image_size: int, args: argparse.Namespace) -> dict:
  """Train-step seconds (batch 1, random data) per conv backward implementation, interleaved run by run so
  that a shared machine's load hits all of them alike. "xla" is the plain path (before)."""
  impls = ("xla", "im2col", "shifted", "mixed")
  rng = np.random.default_rng(args.seed)
  batch = {k: rng.normal(size=(1, image_size, image_size, 3)).astype(np.float32)
           for k in ("image", "image_ae", "penalty")}
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


# --- Report.

def print_inference(results: list[dict], env: dict) -> None:
  print(f"\nInference, host image -> host map ({env['device']}, jax {env['jax_version']}, {env['date']})")
  print("| model | dtype | latency mean ms | p50 | p90 | p99 | throughput img/s (batch) | "
        "paper latency ms | paper img/s (RTX A6000) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    lat, thr, paper = r["latency"], r["throughput"], r["paper"] or {}
    print(f"| {r['size']} | {r['dtype']} | {lat['mean_ms']:.2f} | {lat['p50_ms']:.2f} | "
          f"{lat['p90_ms']:.2f} | "
          f"{lat['p99_ms']:.2f} | {thr['images_per_s']:.1f} ({thr['best_batch_size']}) | "
          f"{paper.get('latency_ms', '-')} | {paper.get('throughput_img_s', '-')} |")


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
  print("| model | image | xla (plain) | im2col | shifted | mixed | auto = |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    m = r["median_step_s"]
    print(f"| {r['size']} | {r['image_size']} | {m['xla']:.3f} | {m['im2col']:.3f} | {m['shifted']:.3f} | "
          f"{m['mixed']:.3f} | {r['auto']} |")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=("inference", "train", "conv"), default="inference")
  p.add_argument("--sizes", default="small,medium")
  p.add_argument("--dtypes", default="float32,bfloat16,float16")
  p.add_argument("--batch-sizes", default="1,8,16,32,64")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--warmup", type=int, default=1000)
  p.add_argument("--runs", type=int, default=1000)
  p.add_argument("--throughput-warmup", type=int, default=10)
  p.add_argument("--throughput-runs", type=int, default=100)
  p.add_argument("--train-steps", type=int, default=20)
  p.add_argument("--train-warmup", type=int, default=2, help="untimed steps (the first one compiles)")
  p.add_argument("--conv-runs", type=int, default=5)
  p.add_argument("--model", default="", help="time a saved model (RUN or RUN/model) instead of random params")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tiny", action="store_true", help="64x64 images, few runs, small model, float32 (CI)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  cli.add_debug_flag(p)
  args = p.parse_args(argv)
  if args.tiny:
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    for key, value in TINY.items():
      if f"--{key.replace('_', '-')}" not in given:
        setattr(args, key, value)
    if "--sizes" not in given:
      args.sizes = "small"
    if "--dtypes" not in given:
      args.dtypes = "float32"
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  env = environment()
  report = {"environment": env, "mode": args.mode, "tiny": args.tiny}
  if args.mode == "inference":
    report["protocol"] = {"warmup": args.warmup, "runs": args.runs, "batch_sizes": args.batch_sizes,
                          "throughput_runs": args.throughput_runs, "model": args.model or "random params"}
    report["results"] = [bench_inference(cfg, det, args) for cfg, det in inference_configs(args)]
    print_inference(report["results"], env)
  elif args.mode == "train":
    report["results"] = [bench_train(ModelConfig(size=s, dtype=d, image_size=args.image_size), args)
                         for s in args.sizes for d in args.dtypes]
    print_train(report["results"], env)
  else:
    report["results"] = [bench_conv(s, args.image_size, args) for s in args.sizes]
    print_conv(report["results"], env)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
  return report


def cli_main(argv=None) -> int:
  main(argv)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(cli_main))
