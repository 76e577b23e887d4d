"""Small defects on rectangular photographs: the whole image squashed to a small square against the native
resolution in tiles of that square's size (BUILD_NOTES.md, "Rectangular images and tiles").

  python -m tools.small_defects data --out /tmp/small             # the data set (seeded)
  python -m tools.small_defects run --out /tmp/small --variant squash --seed 0 --steps 300
  python -m tools.small_defects run --out /tmp/small --variant tiles --seed 0 --steps 300
  python -m tools.small_defects table --out /tmp/small

The data set, in the MVTec AD layout: 192 x 384 (H x W) crops of scikit-image's bundled immunohistochemistry
photograph (`ihc.png`, a real microscope photo of tissue, scaled 2x so the crops hold its texture at a
camera-like scale): training crops from the upper half, test crops from the lower half, and two kinds of SMALL
structural defects drawn on test crops, with masks drawn by the same geometry (exact): a straight 'scratch'
(2-3 px wide, 20-50 px long, bright or dark) and a dark 'crack' (a 2 px polyline of 3 segments, 25-60 px).
A 192 x 384 image squashed to 128 x 128 loses two thirds of its columns: a 2 px scratch becomes sub-pixel.

Variants (each trained with the same steps, seeds and everything else; penalty off, the project's random PDN-S
teacher, as no pretrained weights can be downloaded here). Both train on 128 x 128 inputs (a squashed image or
one tile), so a training step costs the same; predicting costs 8 tiles against one image:
  squash  model.image_size=128                                 the paper's setting at a small square
  tiles   model.image_size=192x384, model.tile=128, overlap 32  native resolution, 2 x 4 = 8 tiles per image

Needs scikit-image (for the photograph), not a project dependency.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

CATEGORY = "tissue"
HEIGHT, WIDTH = 192, 384
COUNTS = {"train": 60, "good": 20, "defect_per_type": 20}
DEFECTS = ("scratch", "crack")
VARIANTS = {
  "squash": ["model.image_size=128"],
  "tiles": [f"model.image_size={HEIGHT}x{WIDTH}", "model.tile=128", "model.tile_overlap=32"],
}


# --- The data set.


def photograph() -> Image.Image:
  import skimage.data

  photo = Image.open(pathlib.Path(skimage.data.__file__).parent / "ihc.png").convert("RGB")
  return photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.BICUBIC)


def crop(photo: Image.Image, rng: np.random.Generator, rows: tuple[int, int]) -> Image.Image:
  x = int(rng.integers(0, photo.width - WIDTH + 1))
  y = int(rng.integers(rows[0], rows[1] - HEIGHT + 1))
  image = photo.crop((x, y, x + WIDTH, y + HEIGHT))
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else image


def defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
  """A copy of `image` with one small defect of `kind`, and its uint8 0/255 mask (the same lines drawn)."""
  image, mask = image.copy(), Image.new("L", image.size, 0)
  start = np.array([rng.uniform(40, WIDTH - 40), rng.uniform(40, HEIGHT - 40)])
  if kind == "scratch":
    angle, length = rng.uniform(0, np.pi), rng.uniform(20, 50)
    points = [start, start + length * np.array([np.cos(angle), np.sin(angle)])]
    width = int(rng.integers(2, 4))
    colour = (245, 240, 235) if rng.uniform() < 0.5 else (40, 25, 30)
  else:  # a crack: a dark polyline that changes direction
    points, angle = [start], rng.uniform(0, 2 * np.pi)
    for _ in range(3):
      angle += rng.uniform(-0.8, 0.8)
      points.append(points[-1] + rng.uniform(8, 20) * np.array([np.cos(angle), np.sin(angle)]))
    width, colour = 2, (30, 20, 25)
  line = [tuple(int(round(v)) for v in np.clip(p, 0, [WIDTH - 1, HEIGHT - 1])) for p in points]
  ImageDraw.Draw(image).line(line, fill=colour, width=width)
  ImageDraw.Draw(mask).line(line, fill=255, width=width)
  return image, np.asarray(mask)


def make_dataset(out: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """out/mvtec/<CATEGORY>/{train/good, test/{good,<defects>}, ground_truth/<defect>/NNN_mask.png}."""
  photo, rng = photograph(), np.random.default_rng(seed)
  base = out / "mvtec" / CATEGORY
  half = photo.height // 2
  train_rows, test_rows = (0, half), (half, photo.height)
  folders = {
    "train/good": [crop(photo, rng, train_rows) for _ in range(COUNTS["train"])],
    "test/good": [crop(photo, rng, test_rows) for _ in range(COUNTS["good"])],
  }
  for kind in DEFECTS:
    folders[f"test/{kind}"] = []
    for i in range(COUNTS["defect_per_type"]):
      image, mask = defect(crop(photo, rng, test_rows), kind, rng)
      folders[f"test/{kind}"].append(image)
      gt = base / "ground_truth" / kind / f"{i:03d}_mask.png"
      gt.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask).save(gt)
  for folder, images in folders.items():
    (base / folder).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
      image.save(base / folder / f"{i:03d}.png")
  return base


# --- Runs.


def run(out: pathlib.Path, variant: str, seed: int, steps: int) -> dict:
  """Trains and evaluates one variant (experiments.train), then times predict per image; writes result.json."""
  workdir = out / f"{variant}_seed{seed}"
  sets = [
    f"data.root={out / 'mvtec'}",
    f"data.category={CATEGORY}",
    "data.penalty=",
    f"train.steps={steps}",
    f"train.seed={seed}",
    f"train.checkpoint_every={steps}",
    "train.log_every=50",
    *VARIANTS[variant],
  ]
  start = time.perf_counter()
  command = [sys.executable, "-m", "experiments.train", "--dataset", "mvtec_ad", "--workdir", str(workdir)]
  subprocess.run(command + [a for s in sets for a in ("--set", s)], check=True)
  wall = time.perf_counter() - start
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  result = {
    "variant": variant,
    "seed": seed,
    "steps": steps,
    "image_auroc": metrics["metrics"]["image_auroc"],
    "au_pro_0.3": metrics["metrics"]["au_pro"]["0.3"],
    "pixel_auroc": metrics["metrics"]["pixel_auroc"],
    "train_and_eval_wall_s": wall,
    "ms_per_image": predict_ms(workdir),
  }
  (workdir / "result.json").write_text(json.dumps(result, indent=2))
  return result


def predict_ms(workdir: pathlib.Path, images: int = 20) -> float:
  """Median ms of the in-process predict of one test image (decode, resize, networks, map at its size)."""
  from efficientad_jax.serving import predict

  model = predict.load(workdir)
  paths = sorted((workdir.parent / "mvtec" / CATEGORY / "test").rglob("*.png"))[:images]
  predict.predict_file(model, paths[0])  # compiles
  times = []
  for path in paths:
    start = time.perf_counter()
    predict.predict_file(model, path)
    times.append(1e3 * (time.perf_counter() - start))
  return float(np.median(times))


def timing(out: pathlib.Path, seed: int, rounds: int = 20) -> dict:
  """Interleaved on one machine state: ms per training step (the trainer's compiled step on the variant's real
  data stream, batch 1) and ms per predicted image (`predict_file`, decode to map), medians over `rounds`,
  for the two variants' runs of `seed`."""
  import jax

  from efficientad_jax import tiles
  from efficientad_jax.data import make_datasets
  from efficientad_jax.serving import predict
  from experiments import benchmark_train

  paths = sorted((out / "mvtec" / CATEGORY / "test").rglob("*.png"))
  steps, models_ = {}, {}
  for variant in VARIANTS:
    model = predict.load(out / f"{variant}_seed{seed}")
    cfg = model.cfg
    ds = make_datasets(cfg.data, cfg.model.image_size, seed, training=True, tiling=tiles.from_model(cfg.model))
    batches = iter(ds.train_iter(1))
    method, holder, mesh = benchmark_train.engine_step(cfg, seed)
    key = jax.random.key(seed)

    def step(method=method, holder=holder, mesh=mesh, batches=batches, key=key):
      holder[0], losses = method.step(
        holder[0], holder[1], benchmark_train.parallel.shard_batch(next(batches), mesh), key
      )
      jax.block_until_ready(losses)

    step()  # compiles
    predict.predict_file(model, paths[0])  # compiles
    steps[variant], models_[variant] = step, model
  times = {v: {"step": [], "image": []} for v in VARIANTS}
  for k in range(rounds):
    for v in VARIANTS:
      start = time.perf_counter()
      steps[v]()
      times[v]["step"].append(1e3 * (time.perf_counter() - start))
      start = time.perf_counter()
      predict.predict_file(models_[v], paths[k % len(paths)])
      times[v]["image"].append(1e3 * (time.perf_counter() - start))
  return {v: {k: float(np.median(t)) for k, t in d.items()} for v, d in times.items()}


def table(out: pathlib.Path) -> str:
  rows = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*/result.json"))]
  head = "| variant | seed | steps | image AU-ROC | AU-PRO 0.3 | pixel AU-ROC | train + eval wall s | ms / image |"
  lines = [head, "|" + "---|" * 8]
  fmt = lambda v: "" if v is None else f"{v:.1f}"
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['seed']} | {r['steps']} | {100 * r['image_auroc']:.1f} | {100 * r['au_pro_0.3']:.1f} | "
      f"{100 * r['pixel_auroc']:.1f} | {r['train_and_eval_wall_s']:.0f} | {fmt(r['ms_per_image'])} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=("data", "run", "time", "table"))
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--variant", choices=tuple(VARIANTS), default="tiles")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=300)
  args = p.parse_args(argv)
  if args.command == "data":
    print(make_dataset(args.out))
  elif args.command == "run":
    print(json.dumps(run(args.out, args.variant, args.seed, args.steps), indent=2))
  elif args.command == "time":
    print(json.dumps(timing(args.out, args.seed), indent=2))
  else:
    print(table(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
