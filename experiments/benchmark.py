"""Latency, throughput and training speed of EfficientAD-JAX beside the paper's numbers (paper §4; docs/method.md §10).

Inference times the library's predict path (`inference.make_predict_fn`, no copy of the models; for a saved model of
any method, the `predict_fn` that `saved_model.load` gives it) from host image to host map, as in the paper's
protocol: host->device copy, teacher, student, autoencoder, both maps and their normalisation, resize to the
image size, device->host copy of the anomaly map and score.

  python -m experiments.benchmark --sizes small,medium --dtypes float32,bfloat16,float16 \
      --batch-sizes 1,8,16,32,64 --out bench.json                     # random params, 1000+1000 runs
  python -m experiments.benchmark --model RUN                         # a saved model (either method), as trained
  python -m experiments.benchmark --mode train --sizes small --train-steps 20   # real step + real data
  python -m experiments.benchmark --mode conv --sizes small              # conv backward per conv_impl
  python -m experiments.benchmark --mode feed --out feed.json            # data stream, loop and predict overhead
  python -m experiments.benchmark --mode deploy --out deploy.json        # CPU backends: jax, onnxruntime, OpenVINO
  python -m experiments.benchmark --mode members --members 1,2,4,8   # N models trained in one program
  python -m experiments.benchmark --mode accelerator --out acc.json  # FIRST on a new accelerator (minutes)
  python -m experiments.benchmark --tiny --out tmp.json                  # 64x64, few runs (CI)

The defaults (1000 warm-up + 1000 runs at 256x256) are meant for an accelerator; on a CPU one PDN-S image
takes on the order of a second, so pass e.g. `--warmup 3 --runs 20 --batch-sizes 1,4`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from efficientad_jax import models
from efficientad_jax.config import Config, ImageSize, MapConfig, ModelConfig
from efficientad_jax.efficientad import inference, normalization
from efficientad_jax.efficientad.inference import Detector
from efficientad_jax.serving import saved_model
from efficientad_jax.training import compiler
from experiments import (
  benchmark_accelerator,
  benchmark_deploy,
  benchmark_feed,
  benchmark_members,
  benchmark_train,
  cli,
)

# docs/method.md §10 (paper §4): the paper's latency (batch 1, half precision) and throughput on an RTX A6000.
PAPER = {"small": {"latency_ms": 2.2, "throughput_img_s": 614}, "medium": {"latency_ms": 4.5, "throughput_img_s": 269}}
DEFAULTS = {
  "members": "1,2,4,8",
  "sizes": "small,medium",
  "dtypes": "float32,bfloat16,float16",
  "batch_sizes": "1,8,16,32,64",
  "image_size": 256,
  "warmup": 1000,
  "runs": 1000,
  "throughput_warmup": 10,
  "throughput_runs": 100,
  "train_steps": 20,
  "train_warmup": 2,
  "conv_runs": 5,
  "dispatch": "1",
  "feed_workers": "0,1,2",
  "feed_dispatch": "1,64",
  "feed_images": 16,
  "feed_penalty_images": 32,
  "feed_steps": 600,
  "feed_steps_before": 150,
  "feed_warmup": 20,
  "feed_loop_logs": 40,
  "feed_loop_repeats": 3,
  "feed_predict_rounds": 30,
  "deploy_runs": 15,
  "deploy_warmup": 2,
}
TINY = dict(
  DEFAULTS,
  members="1,2",
  sizes="small",
  dtypes="float32",
  batch_sizes="1,2",
  image_size=64,
  warmup=1,
  runs=3,
  throughput_warmup=1,
  throughput_runs=2,
  train_steps=3,
  train_warmup=1,
  conv_runs=1,
  feed_workers="0",
  feed_dispatch="1,4",
  feed_images=2,
  feed_penalty_images=2,
  feed_steps=6,
  feed_steps_before=3,
  feed_warmup=1,
  feed_loop_logs=3,
  feed_loop_repeats=1,
  feed_predict_rounds=1,
  deploy_runs=2,
  deploy_warmup=1,
)


def environment() -> dict:
  """Device, versions and date: a timing means nothing without them."""
  dev = jax.devices()[0]
  return {
    "device": dev.device_kind,
    "platform": dev.platform,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "host": platform.machine(),
    "jax_version": jax.__version__,
    "flax_version": flax.__version__,
    "date": datetime.date.today().isoformat(),
    "compiler_options": compiler.compiler_options(),
  }


def pdn_out(image_size: int, size: str) -> int:
  return models.pdn_output_size((image_size, image_size), size)[0]


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


def plausible_detector(cfg: ModelConfig, key: jax.Array) -> Detector:
  """Random params with teacher statistics and map quantiles fitted on two random images (the calibration of
  training, `inference.calibrate`), so the maps and their normalisation run on realistic
  magnitudes (no zeros or infinities)."""
  config = Config(model=cfg)
  nets = models.build(cfg)
  params = models.init_params(nets, key, cfg.image_size)
  images = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (2, *cfg.image_size, 3)))
  feats = np.asarray(nets.teacher.apply({"params": params["teacher"]}, images), np.float64)
  stats = normalization.TeacherStats(
    mean=jnp.asarray(feats.mean(axis=(0, 1, 2)), jnp.float32),
    std=jnp.asarray(feats.std(axis=(0, 1, 2)) + 1e-6, jnp.float32),
  )
  records = [{"image": image, "orig_size": np.array(image.shape[:2])} for image in images]
  return inference.calibrate(config, params, stats, records, batch_size=2)[0]


def host_run(
  predict_fn: Callable[..., dict], detector: object, out_size: tuple[int, int]
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """fn(host images [B, S, S, 3]) -> (host maps [B, *out_size], host scores [B]) through `predict_fn`."""
  device = jax.devices()[0]

  def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = predict_fn(detector, jax.device_put(images, device), out_size=out_size)
    return np.asarray(out["anomaly_map"]), np.asarray(out["score"])

  return run


def host_predict_fn(size: str, dtype: str, image_size: int, seed: int = 0):
  """Random-parameter EfficientAD-`size` as fn(host images) -> (host maps, host scores), through the predict
  function a saved model of this config gets (`inference.compiled_predict`)."""
  cfg = ModelConfig(size=size, dtype=dtype, image_size=image_size)
  detector = plausible_detector(cfg, jax.random.key(seed))
  return host_run(inference.compiled_predict(cfg, MapConfig())[1], detector, tuple(cfg.image_size))


class Timed(NamedTuple):
  """One model to time: its labels and fn(host images) -> (host maps, host scores)."""

  method: str
  size: str
  dtype: str
  image_size: tuple[int, int]  # (H, W)
  run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def bench_inference(timed: Timed, args: argparse.Namespace) -> dict:
  """Latency (batch 1) and throughput (best of `--batch-sizes`) of one model."""
  s, run = timed.image_size, timed.run
  rng = np.random.default_rng(args.seed)
  one = rng.normal(size=(1, *s, 3)).astype(np.float32)
  result = {
    "method": timed.method,
    "size": timed.size,
    "dtype": timed.dtype,
    "image_size": list(s),
    "latency": benchmark_train.summarize(time_calls(lambda: run(one), args.warmup, args.runs)),
  }
  per_batch = {}
  for b in args.batch_sizes:
    images = rng.normal(size=(b, *s, 3)).astype(np.float32)
    seconds = time_calls(lambda images=images: run(images), args.throughput_warmup, args.throughput_runs)
    median = float(np.median(seconds))
    per_batch[str(b)] = {"images_per_s": b / median, "median_batch_ms": 1e3 * median}
  best = max(per_batch, key=lambda k: per_batch[k]["images_per_s"])
  result["throughput"] = {
    "per_batch": per_batch,
    "best_batch_size": int(best),
    "images_per_s": per_batch[best]["images_per_s"],
  }
  result["paper"] = PAPER.get(timed.size) if timed.method == "efficientad" else None
  return result


def inference_targets(args: argparse.Namespace) -> Iterator[Timed]:
  """The saved model of `--model` (any method, at its trained dtype), or random-parameter EfficientAD for
  every size x dtype asked for; built one at a time, as they are timed."""
  if args.model:
    model = saved_model.load(args.model)
    s = model.image_size
    yield Timed(
      model.method.name,
      str(model.meta.get("model_size", model.method.name)),
      model.inputs.dtype,
      s,
      host_run(model.predict_fn, model.detector, tuple(s)),
    )
    return
  for size in args.sizes:
    for dtype in args.dtypes:
      yield Timed("efficientad", size, dtype, args.image_size, host_predict_fn(size, dtype, args.image_size, args.seed))


def predict_overhead(args: argparse.Namespace, n: int = 32) -> dict:
  """Host time per call of the one predict path (batch 1, tiny image, host image -> host map and score) beyond
  its compute: per round, the median of 10 calls minus the per-image time of the same `inference.predict`
  mapped over `n` images inside one call; the median over rounds (interleaved, so load changes hit both alike).
  Also the host's own share of a call: the time until the call returns (dispatch is asynchronous) plus the
  copy of the results once they are ready."""
  size = benchmark_feed.LOOP_IMAGE_SIZE
  cfg, maps = ModelConfig(image_size=size), MapConfig()
  detector = plausible_detector(cfg, jax.random.key(args.seed))
  nets, jitted = inference.compiled_predict(cfg, maps)
  one_call = host_run(jitted, detector, (size, size))
  mapped = compiler.jit(
    lambda det, xs: jax.lax.map(lambda x: inference.predict(nets, maps, det, x, (size, size))["score"], xs)
  )
  rng = np.random.default_rng(args.seed)
  one = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  many = jax.device_put(rng.normal(size=(n, 1, size, size, 3)).astype(np.float32))
  device = jax.devices()[0]
  differences, calls, per_image, host = [], [], [], []
  for _ in range(args.feed_predict_rounds):
    call = float(np.median(time_calls(lambda: one_call(one), 2, 10)))
    image = time_calls(lambda: np.asarray(mapped(detector, many)), 1, 1)[0] / n
    calls.append(call)
    per_image.append(image)
    differences.append(call - image)
    start = time.perf_counter()
    out = jitted(detector, jax.device_put(one, device), out_size=(size, size))
    returned = time.perf_counter()
    jax.block_until_ready(out)
    ready = time.perf_counter()
    np.asarray(out["anomaly_map"]), np.asarray(out["score"])
    host.append(returned - start + time.perf_counter() - ready)
  ms = lambda v: 1e3 * float(np.median(v))
  return {
    "image_size": size,
    "call_ms": ms(calls),
    "compute_ms": ms(per_image),
    "overhead_ms": ms(differences),
    "overhead_iqr_ms": [1e3 * float(q) for q in np.percentile(differences, [25, 75])],
    "host_share_ms": ms(host),
    "rounds": len(differences),
    "mapped_images": n,
  }


# --- Report.


def print_inference(results: list[dict], env: dict) -> None:
  print(f"\nInference, host image -> host map ({env['device']}, jax {env['jax_version']}, {env['date']})")
  print(
    "| model | dtype | latency mean ms | p50 | p90 | p99 | throughput img/s (batch) | "
    "paper latency ms | paper img/s (RTX A6000) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    lat, thr, paper = r["latency"], r["throughput"], r["paper"] or {}
    print(
      f"| {r['size']} | {r['dtype']} | {lat['mean_ms']:.2f} | {lat['p50_ms']:.2f} | "
      f"{lat['p90_ms']:.2f} | "
      f"{lat['p99_ms']:.2f} | {thr['images_per_s']:.1f} ({thr['best_batch_size']}) | "
      f"{paper.get('latency_ms', '-')} | {paper.get('throughput_img_s', '-')} |"
    )


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--mode", choices=("inference", "train", "conv", "feed", "deploy", "members", "accelerator"), default="inference"
  )
  p.add_argument("--sizes", help="default small,medium (--tiny: small)")
  p.add_argument("--dtypes", help="default float32,bfloat16,float16 (--tiny: float32); not with --model")
  p.add_argument("--batch-sizes", help="default 1,8,16,32,64 (--tiny: 1,2)")
  p.add_argument("--image-size", help="S or HxW, e.g. 192x384; default 256 (--tiny: 64)")
  p.add_argument("--warmup", type=int)
  p.add_argument("--runs", type=int)
  p.add_argument("--throughput-warmup", type=int)
  p.add_argument("--throughput-runs", type=int)
  p.add_argument("--train-steps", type=int)
  p.add_argument("--train-warmup", type=int, help="untimed steps (the first one compiles)")
  p.add_argument("--conv-runs", type=int)
  p.add_argument("--dispatch", help="--mode train: steps per call K to time, e.g. 1,64 (default 1)")
  p.add_argument("--feed-workers", help="--mode feed: grain worker counts to time (default 0,1,2)")
  p.add_argument("--feed-dispatch", help="--mode feed: steps per call K of the loop overhead (default 1,64)")
  p.add_argument("--feed-images", type=int, help="--mode feed: generated 1024x1024 training PNGs (default 16)")
  p.add_argument("--feed-penalty-images", type=int, help="--mode feed: generated 500x375 JPEGs (default 32)")
  p.add_argument("--feed-steps", type=int, help="--mode feed: timed batches per worker count (default 600)")
  p.add_argument("--feed-steps-before", type=int, help="--mode feed: timed batches, old pipeline (default 150)")
  p.add_argument("--feed-warmup", type=int, help="--mode feed: untimed batches (default 20)")
  p.add_argument("--feed-loop-logs", type=int, help="--mode feed: log intervals of the long loop (default 40)")
  p.add_argument("--feed-loop-repeats", type=int, help="--mode feed: loop timings, median (default 3)")
  p.add_argument("--feed-predict-rounds", type=int, help="--mode feed: predict timing rounds (default 30)")
  p.add_argument("--members", help="--mode members: models per program to time, e.g. 1,2,4,8 (default; --tiny: 1,2)")
  p.add_argument("--deploy-runs", type=int, help="--mode deploy: timed rounds, median (default 15)")
  p.add_argument("--deploy-warmup", type=int, help="--mode deploy: untimed rounds (default 2)")
  p.add_argument(
    "--conv-impls",
    default=",".join(benchmark_train.CONV_IMPLS),
    help="--mode conv: the backward implementations to time (default: all)",
  )
  p.add_argument(
    "--model",
    default="",
    help="time a saved model (RUN or RUN/model, either method, in the "
    "dtype it was trained with) instead of random params",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tiny", action="store_true", help="64x64 images, few runs, small model, float32 (CI)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  cli.add_debug_flag(p)
  args = p.parse_args(argv)
  if args.model and args.dtypes is not None:
    p.error("--dtypes applies to random parameters: a saved model (--model) is timed in the dtype it was trained with")
  if args.mode == "accelerator" and args.dtypes is None and not args.tiny:
    args.dtypes = "float32,bfloat16"  # the accelerator check's two precisions
  if args.mode == "deploy" and args.batch_sizes is None and not args.tiny:
    args.batch_sizes = "1,8"  # the deployment question: one part at a time, or a few
  for key, value in (TINY if args.tiny else DEFAULTS).items():  # what the command line left unset
    if getattr(args, key) is None:
      setattr(args, key, value)
  try:
    args.image_size = ImageSize(args.image_size)
  except ValueError as e:
    p.error(f"--image-size: {e}")
  args.sizes = [s for s in args.sizes.split(",") if s]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
  args.conv_impls = [i for i in args.conv_impls.split(",") if i]
  for name in ("dispatch", "feed_workers", "feed_dispatch", "members"):
    try:
      setattr(args, name, [int(v) for v in getattr(args, name).split(",") if v])
    except ValueError:
      p.error(f"--{name.replace('_', '-')}: comma-separated integers, got {getattr(args, name)!r}")
    if not getattr(args, name) or min(getattr(args, name)) < (0 if name == "feed_workers" else 1):
      p.error(f"--{name.replace('_', '-')}: at least one value, each >= {0 if name == 'feed_workers' else 1}")
  unknown = set(args.conv_impls) - set(benchmark_train.CONV_IMPLS)
  if unknown or not args.conv_impls:
    p.error(
      f"--conv-impls: choose from {','.join(benchmark_train.CONV_IMPLS)}, got {','.join(sorted(unknown)) or 'none'}"
    )
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  env = environment()
  report = {"environment": env, "mode": args.mode, "tiny": args.tiny}
  if args.mode == "inference":
    report["protocol"] = {
      "warmup": args.warmup,
      "runs": args.runs,
      "batch_sizes": args.batch_sizes,
      "throughput_runs": args.throughput_runs,
      "model": args.model or "random params",
    }
    report["results"] = [bench_inference(timed, args) for timed in inference_targets(args)]
    print_inference(report["results"], env)
  elif args.mode == "train":
    report["results"] = [
      benchmark_train.bench_train(ModelConfig(size=s, dtype=d, image_size=args.image_size), k, args)
      for s in args.sizes
      for d in args.dtypes
      for k in args.dispatch
    ]
    benchmark_train.print_train(report["results"], env)
  elif args.mode == "feed":
    stream = benchmark_feed.bench_stream(args)
    loop = benchmark_feed.bench_loop(args)
    predict = predict_overhead(args, n=4 if args.tiny else 32)
    report.update(
      feed_steps_per_s=stream["feed_steps_per_s"],
      feed_steps_per_s_before=stream["feed_steps_per_s_before"],
      loop_overhead_ms_per_step=loop[str(max(args.feed_dispatch))]["ms_per_step"],
      predict_overhead_ms=predict["overhead_ms"],
      stream=stream,
      loop=loop,
      predict=predict,
    )
    benchmark_feed.print_feed(report, env)
  elif args.mode == "accelerator":
    inference = lambda a: [bench_inference(timed, a) for timed in inference_targets(a)]
    train = lambda a: [
      benchmark_train.bench_train(ModelConfig(size="small", image_size=a.image_size), k, a)
      for k in ((1,) if a.tiny else (1, 64))  # XLA:CPU runs K-step loops slowly: --tiny times K = 1
    ]
    report.update(benchmark_accelerator.bench_accelerator(args, inference, train))
    benchmark_accelerator.print_accelerator(report, env)
  elif args.mode == "members":
    report["results"] = [r for s in args.sizes for r in benchmark_members.bench_members(s, args)]
    benchmark_members.print_members(report["results"], env)
  elif args.mode == "deploy":
    env.update(cpu=benchmark_deploy.cpu(), versions=benchmark_deploy.versions())
    report["protocol"] = {"runs": args.deploy_runs, "warmup": args.deploy_warmup, "batch_sizes": args.batch_sizes}
    report["results"] = benchmark_deploy.bench_deploy(args)
    benchmark_deploy.print_deploy(report["results"], env)
  else:
    report["results"] = [benchmark_train.bench_conv(s, args.image_size, args) for s in args.sizes]
    benchmark_train.print_conv(report["results"], env)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
  return report


def cli_main(argv=None) -> int:
  main(argv)
  return 0


def command() -> None:
  """The `efficientad-benchmark` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(cli_main))


if __name__ == "__main__":
  command()
