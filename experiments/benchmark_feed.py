"""The host side of training for `experiments.benchmark --mode feed`: what feeds the step, not the step.

stream          steps/s of the training data stream alone (`Datasets.train_iter`, batch 1, with the
                ImageNet penalty) on inputs of MVTec size: generated 1024x1024 PNG training images and 500x375
                JPEG penalty images. "before" is the stream as it was before the decode cache (commit 3fa490b),
                rebuilt here from the same preprocessing functions (`legacy_stream`): every image decoded at
                every use in the main process's grain threads, PIL's ImageEnhance jitter, float32 normalised on
                the host. Then today's stream (`Datasets.train_iter`) without the cache
                (`data.decode_cache=false`) and with it, with 0, 1, 2, ... grain worker processes; the same inputs
                in the same run.
loop overhead   host time per step of the training loop itself (`engine.run_stage` driving
                `trainer.make_advance`: stacking K batches, copying them to the device, dispatch, bookkeeping,
                the NaN check and log reads) with K = 1 and K = 64 steps per call. The step is a stand-in with
                the real state (every parameter and Adam moment, donated) and the real batch shapes at a tiny
                image size, whose compute is a few reductions, so the wall time per step IS the loop's cost.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance

from efficientad_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from efficientad_jax.data import indexes, make_datasets, pipeline, preprocess
from efficientad_jax.data.api import build_index
from efficientad_jax.efficientad import trainer
from efficientad_jax.training import engine, parallel

TRAIN_SIZE = 1024  # MVTec AD images are 700-1024 px square
PENALTY_SIZE = (500, 375)  # a typical ImageNet photo (W, H)
LOOP_IMAGE_SIZE = 64  # "tiny": the loop's batches, at which copying them costs next to nothing
_ENHANCERS = {
  "brightness": ImageEnhance.Brightness,
  "contrast": ImageEnhance.Contrast,
  "saturation": ImageEnhance.Color,
}
LOSS_KEYS = ("loss", "loss_hard", "loss_penalty", "loss_st", "loss_ae", "loss_stae")


def make_inputs(root: pathlib.Path, num_train: int, num_penalty: int, seed: int) -> tuple[DataConfig, DataConfig]:
  """MVTec AD layout with `num_train` 1024^2 PNGs (textured, so they compress like photographs) and a folder of
  500x375 JPEGs; returns the data configs of the pipeline before (no cache, no workers) and after."""
  rng = np.random.default_rng(seed)
  train = root / "mvtec" / "part" / "train" / "good"
  test = root / "mvtec" / "part" / "test" / "good"
  penalty = root / "penalty"
  for folder in (train, test, penalty):
    folder.mkdir(parents=True)

  def texture(w: int, h: int) -> Image.Image:
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, np.int16) + noise, 0, 255).astype(np.uint8))

  for i in range(num_train):
    texture(TRAIN_SIZE, TRAIN_SIZE).save(train / f"{i:03d}.png")
  texture(TRAIN_SIZE, TRAIN_SIZE).save(test / "000.png")
  for i in range(num_penalty):
    texture(*PENALTY_SIZE).save(penalty / f"{i:03d}.jpg", quality=90)
  before = DataConfig(
    dataset="mvtec_ad",
    root=str(root / "mvtec"),
    category="part",
    penalty=str(penalty),
    decode_cache=False,
    num_workers=0,
  )
  return before, dataclasses.replace(before, decode_cache=True)


def _legacy_train_element(record, rng: np.random.Generator, image_size: int, data: DataConfig) -> dict:
  rgb = preprocess.decode_image(record.image, record.image)
  kind, factor = preprocess.draw_jitter(rng, data.jitter_low, data.jitter_high)
  jittered = np.asarray(_ENHANCERS[kind](Image.fromarray(rgb)).enhance(factor))
  return {
    "image": preprocess.model_input(rgb, image_size, data.mean, data.std),
    "image_ae": preprocess.model_input(jittered, image_size, data.mean, data.std),
  }


def _legacy_penalty_element(path: str, rng: np.random.Generator, image_size: int, data: DataConfig) -> np.ndarray:
  return preprocess.penalty_image(
    preprocess.decode_image(path, path),
    rng,
    data.penalty_resize,
    image_size,
    data.penalty_grayscale_prob,
    data.mean,
    data.std,
  )


def legacy_stream(data: DataConfig, image_size: int) -> grain.DatasetIterator:
  """The training stream before the decode cache: the same grain structure and seeds, float32 output."""
  samples = build_index(data, 0)[0].train
  penalty = indexes.penalty_source(data.penalty)
  ds = (
    grain.MapDataset.source(samples)
    .shuffle(pipeline.sub_seed(0, "shuffle"))
    .repeat()
    .random_map(
      functools.partial(_legacy_train_element, image_size=image_size, data=data), seed=pipeline.sub_seed(0, "jitter")
    )
  )
  pen = (
    grain.MapDataset.source(penalty)
    .shuffle(pipeline.sub_seed(0, "penalty_shuffle"))
    .repeat()
    .random_map(
      functools.partial(_legacy_penalty_element, image_size=image_size, data=data), seed=pipeline.sub_seed(0, "penalty")
    )
  )
  ds = grain.experimental.ZipMapDataset([ds, pen]).map(lambda pair: {**pair[0], "penalty": pair[1]})
  ds = ds[0::1].batch(1, drop_remainder=True)  # as train_dataset (its process slice)
  return iter(
    ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, data.prefetch), prefetch_buffer_size=data.prefetch))
  )


def stream_steps_per_s(data: DataConfig, image_size: int, warmup: int, steps: int, legacy: bool = False) -> dict:
  """Batches (of one image, with its penalty image) per second of one training stream, after `warmup`
  batches (worker start-up and the cache build are reported apart, as setup)."""
  start = time.perf_counter()
  it = (
    legacy_stream(data, image_size)
    if legacy
    else make_datasets(data, image_size=image_size, seed=0, training=True).train_iter(1)
  )
  for _ in range(warmup):
    next(it)
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  wall = time.perf_counter() - start
  it.close() if hasattr(it, "close") else None
  return {
    "stream": "before" if legacy else "today",
    "decode_cache": data.decode_cache and not legacy,
    "num_workers": data.num_workers,
    "steps": steps,
    "steps_per_s": steps / wall,
    "setup_s": setup_s,
  }


def bench_stream(args) -> dict:
  """The stream before and after, on the same generated inputs."""
  with tempfile.TemporaryDirectory(prefix="efficientad_feed_") as root:
    before, after = make_inputs(pathlib.Path(root), args.feed_images, args.feed_penalty_images, args.seed)
    old = stream_steps_per_s(before, args.image_size, args.feed_warmup, args.feed_steps_before, legacy=True)
    uncached = stream_steps_per_s(before, args.image_size, args.feed_warmup, args.feed_steps_before)
    new = [
      stream_steps_per_s(dataclasses.replace(after, num_workers=w), args.image_size, args.feed_warmup, args.feed_steps)
      for w in args.feed_workers
    ]
  best = max(new, key=lambda r: r["steps_per_s"])
  return {
    "before": old,
    "no_cache": uncached,
    "after": new,
    "feed_steps_per_s_before": old["steps_per_s"],
    "feed_steps_per_s": best["steps_per_s"],
    "best_num_workers": best["num_workers"],
  }


class _Batches:
  """An endless in-memory batch iterator with the engine's progress hooks (a position)."""

  def __init__(self, batches: list[dict]):
    self.batches, self.position = batches, 0

  def __next__(self) -> dict:
    self.position += 1
    return self.batches[self.position % len(self.batches)]

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = state["position"]


def stand_in_step(state, frozen, batch, key):
  """The step's signature, inputs and outputs at (almost) no compute: the donated state comes back as it is.
  For K stacked batches it reads the last one, as `train_step.train_steps` reports the last step's losses."""
  del frozen, key
  last = lambda v: v[-1] if v.ndim == 5 else v
  level = sum(jnp.mean(last(batch[k]).astype(jnp.float32)) for k in ("image", "image_ae", "penalty"))
  return state, {k: level for k in LOSS_KEYS}


def loop_seconds(
  cfg: Config, per_dispatch: int, total: int, log_every: int, mesh, method, frozen, batches: list[dict]
) -> float:
  """Wall seconds of one `engine.run_stage` of `total` steps (fresh run directory, one final checkpoint)."""
  stand_in = method._replace(
    step=parallel.compile_step(stand_in_step, mesh, "rrdr", "rr", donate=(0,)),
    steps=parallel.compile_step(stand_in_step, mesh, "rrsr", "rr", donate=(0,)),
  )
  key = jax.random.key(0)
  stage = engine.Stage("", total, log_every, checkpoint_every=total, max_to_keep=1, per_dispatch=per_dispatch)
  with tempfile.TemporaryDirectory(prefix="efficientad_loop_") as workdir:
    it = _Batches(batches)
    hooks = engine.Hooks(
      fresh=lambda: (parallel.new_state(method.init, key, mesh), frozen),
      template=lambda: None,
      progress=it.get_state,
      resume=it.set_state,
    )
    start = time.perf_counter()
    engine.run_stage(
      stage, pathlib.Path(workdir), trainer.make_advance(stand_in, it, mesh, key), hooks, show_progress=False
    )
    return time.perf_counter() - start


def bench_loop(args) -> dict:
  """Per-step loop overhead for each K of `args.feed_dispatch`: the slope of wall time over steps between two
  run lengths, so the fixed costs (state creation, the final checkpoint) cancel."""
  cfg = Config(model=ModelConfig(image_size=LOOP_IMAGE_SIZE), train=TrainConfig(steps=1))
  mesh = parallel.data_mesh(parallel.data_parallel_devices(1))
  method = trainer.pieces(cfg, mesh)
  frozen = parallel.replicate({"teacher_stand_in": np.zeros(1, np.float32)}, mesh)
  rng = np.random.default_rng(args.seed)
  shape = (1, LOOP_IMAGE_SIZE, LOOP_IMAGE_SIZE, 3)
  batches = [
    {k: rng.integers(0, 256, shape, dtype=np.uint8) for k in ("image", "image_ae", "penalty")} for _ in range(8)
  ]  # what the stream sends
  out = {}
  for k in args.feed_dispatch:
    log_every = k * max(1, 128 // k)  # every 128 steps (K <= 128): the trainer's log reads and NaN checks
    short, long = log_every * 2, log_every * args.feed_loop_logs
    loop_seconds(cfg, k, short, log_every, mesh, method, frozen, batches)  # compiles this K
    seconds = [
      (
        loop_seconds(cfg, k, long, log_every, mesh, method, frozen, batches)
        - loop_seconds(cfg, k, short, log_every, mesh, method, frozen, batches)
      )
      / (long - short)
      for _ in range(args.feed_loop_repeats)
    ]
    out[str(k)] = {
      "ms_per_step": 1e3 * float(np.median(seconds)),
      "runs_ms": [1e3 * s for s in seconds],
      "steps": long,
      "log_every": log_every,
    }
  return out


def print_feed(report: dict, env: dict) -> None:
  print(f"\nTraining feed ({env['device']}, {env.get('cpu_count', '?')} CPUs, {env['date']})")
  print("| stream | workers | steps/s |")
  print("|---|---|---|")
  print(f"| before (decode every use, float32 on the host) | 0 | {report['feed_steps_per_s_before']:.1f} |")
  print(f"| today, decode_cache=false | 0 | {report['stream']['no_cache']['steps_per_s']:.1f} |")
  for r in report["stream"]["after"]:
    print(f"| decoded cache | {r['num_workers']} | {r['steps_per_s']:.1f} |")
  print("\n| steps per call | loop overhead ms/step |")
  print("|---|---|")
  for k, r in report["loop"].items():
    print(f"| {k} | {r['ms_per_step']:.4f} |")
  p = report["predict"]
  print(
    f"\npredict overhead per call (batch 1, {p['image_size']}^2): {report['predict_overhead_ms']:.3f} ms "
    f"(IQR {p['overhead_iqr_ms'][0]:.3f}..{p['overhead_iqr_ms'][1]:.3f}) beyond {p['compute_ms']:.3f} ms of "
    f"compute; the host's own share of a call (until it returns, plus the result copy): "
    f"{p['host_share_ms']:.3f} ms"
  )
