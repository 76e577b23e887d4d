"""Side by side with the reference implementation on real photographs (BUILD_NOTES.md, "Side by side with the
reference on real images").

Trains nelson1425/EfficientAD's own, unmodified `efficientad.py` and this project on the same small real-image
category in the MVTec AD layout, from the same random PDN-S teacher, and scores both sides' full-resolution
maps with the same metric code (ours, which matches the official MVTec AD script: tests/test_metrics_fixtures.py).
The reference is never copied into this repository: point `--reference` at a checkout of it. The learning rate of
its every update is read through PyTorch's global optimizer hook, which changes nothing; `--decay-factor` is the one
ablation that changes the script's behaviour (its StepLR's factor).

  python -m tools.side_by_side data --out /tmp/sbs --reference /path/to/EfficientAD [--photo ihc.png]
  python -m tools.side_by_side reference --out /tmp/sbs --reference /path/to/EfficientAD --seed 42 --steps 1000
  python -m tools.side_by_side ours --out /tmp/sbs --seed 0 --steps 1000 [--set key=value ...] [--tag _name]
  python -m tools.side_by_side reference ... --decay-factor 1 --tag _nodecay   # an ablation of the reference
  python -m tools.side_by_side table --out /tmp/sbs      # one row per run, with its learning rate and where it drops
  python -m tools.side_by_side branches --out /tmp/sbs    # each branch's losses on test/good, both sides
  python -m tools.side_by_side types --out /tmp/sbs       # each branch's image AU-ROC by defect type
  python -m tools.side_by_side crossfeed --out /tmp/sbs --reference /path/to/EfficientAD --run /tmp/sbs/ours_seed1 \
      --seed 1 --steps 200 --stream ours|reference     # the reference's loop on either training stream
  python -m tools.side_by_side_pool /tmp/sbsg /tmp/sbsb /tmp/sbsr   # several photographs' runs pooled

The data set: crops of one of scikit-image's bundled photographs, by default the immunohistochemistry photograph
(`ihc.png`, a real microscope photo of tissue, a texture; `data --photo brick.png` takes another, the category is
named after it), 192x192: training crops from the upper part, test crops from the lower part, and
three structural defect types drawn on test crops with their masks (a pasted patch of another photograph,
a scratch, a colour stain). Every step is seeded.

Needs torch and torchvision (the reference's own requirements) and scikit-image; none is a project dependency.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO = "ihc.png"  # the default photograph; the category is named after the photograph (`category`)
CROP = 192
TEST_FROM = 0.55  # the share of the photograph's height above its test part (training crops overlap it by CROP / 3)
COUNTS = {"train": 80, "good": 25, "defect_per_type": 25}
DEFECTS = ("patch", "scratch", "stain")
TEACHER_SEED = 0  # torch.manual_seed before the reference's get_pdn_small(384)


# --- The data set.


def skimage_photo(name: str) -> Image.Image:
  """A photograph bundled with scikit-image (a file name in skimage/data), as RGB."""
  import skimage.data

  return Image.open(pathlib.Path(skimage.data.__file__).parent / name).convert("RGB")


def _crop(photo: Image.Image, rng: np.random.Generator, rows: tuple[int, int]) -> Image.Image:
  x = int(rng.integers(0, photo.width - CROP + 1))
  y = int(rng.integers(rows[0], rows[1] - CROP + 1))
  img = photo.crop((x, y, x + CROP, y + CROP))
  if rng.uniform() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return img


def _defect(
  img: Image.Image, kind: str, rng: np.random.Generator, other: Image.Image
) -> tuple[Image.Image, np.ndarray]:
  """Draws one defect of `kind` on a copy of `img`; returns it and the uint8 0/255 mask."""
  img = img.copy()
  mask = Image.new("L", img.size, 0)
  draw = ImageDraw.Draw(mask)
  if kind == "patch":  # a piece of another photograph pasted in
    s = int(rng.integers(16, 36))
    x, y = (int(v) for v in rng.integers(8, CROP - s - 8, size=2))
    ox, oy = (int(v) for v in rng.integers(0, other.width - s, size=2))
    img.paste(other.crop((ox, oy, ox + s, oy + s)), (x, y))
    draw.rectangle((x, y, x + s - 1, y + s - 1), fill=255)
  elif kind == "scratch":  # a thin dark or bright line
    p0 = rng.integers(20, CROP - 20, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(30, 70)
    p1 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0, CROP - 1)
    width = int(rng.integers(2, 5))
    colour = (40, 30, 30) if rng.uniform() < 0.5 else (235, 235, 225)
    line = [tuple(int(v) for v in p0), tuple(int(v) for v in p1)]
    ImageDraw.Draw(img).line(line, fill=colour, width=width)
    draw.line(line, fill=255, width=width)
  else:  # a soft colour stain
    r = int(rng.integers(10, 22))
    cx, cy = (int(v) for v in rng.integers(r + 8, CROP - r - 8, size=2))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    tint = Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(0, 256, size=3)))
    alpha = mask.filter(ImageFilter.GaussianBlur(2)).point(lambda v: int(v * 0.6))
    img = Image.composite(tint, img, alpha)
  return img, np.asarray(mask)


def category(out: pathlib.Path) -> str:
  """The one category under out/mvtec (named after the photograph `data` cropped it from)."""
  found = sorted(p.name for p in (out / "mvtec").glob("*") if p.is_dir())
  if len(found) != 1:
    raise SystemExit(f"error: {out / 'mvtec'} holds {len(found)} categories, not one: run `data` into a new --out")
  return found[0]


def make_dataset(out: pathlib.Path, seed: int = 0, photo_name: str = PHOTO) -> pathlib.Path:
  """out/mvtec/<photo's stem>/{train/good, test/{good,<defects>}, ground_truth/<defect>/NNN_mask.png}, cropped
  from scikit-image's bundled `photo_name` (a grayscale one as 3 equal channels)."""
  other_name = "coffee.png" if photo_name != "coffee.png" else "astronaut.png"
  photo, other = skimage_photo(photo_name), skimage_photo(other_name)
  rng = np.random.default_rng(seed)
  base = out / "mvtec" / pathlib.Path(photo_name).stem
  split_row = int(photo.height * TEST_FROM)
  if photo.width < CROP or photo.height - split_row < CROP:  # test crops come from below split_row
    need = int(np.ceil(CROP / (1 - TEST_FROM)))
    raise SystemExit(f"error: {photo_name} is {photo.width}x{photo.height} px; {CROP} px crops need {CROP}x{need}")
  train_rows, test_rows = (0, split_row + CROP // 3), (split_row, photo.height)
  folders = {
    "train/good": [_crop(photo, rng, train_rows) for _ in range(COUNTS["train"])],
    "test/good": [_crop(photo, rng, test_rows) for _ in range(COUNTS["good"])],
  }
  for kind in DEFECTS:
    images = []
    for i in range(COUNTS["defect_per_type"]):
      img, mask = _defect(_crop(photo, rng, test_rows), kind, rng, other)
      images.append(img)
      gt = base / "ground_truth" / kind / f"{i:03d}_mask.png"
      gt.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask).save(gt)
    folders[f"test/{kind}"] = images
  for folder, images in folders.items():
    (base / folder).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
      img.save(base / folder / f"{i:03d}.png")
  return base


# --- The reference, run from its own checkout in a subprocess.

# torchvision's CPU wheel may not match torch's build; the reference only needs its PIL transforms and
# ImageFolder, not the compiled operators whose registration fails then.
_TV_STUB = 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("stub"))'

# With `decay` set (a number as text), the reference's StepLR decays by that factor instead of its own 0.1: the
# ablation that shows what the learning-rate drop does to each branch (BUILD_NOTES.md, "The autoencoder branch").
_DECAY_ABLATION = textwrap.dedent("""
    if decay:
        class StepLR(torch.optim.lr_scheduler.StepLR):
            def __init__(self, optimizer, step_size, gamma=0.1, **kw):
                super().__init__(optimizer, step_size, gamma=float(decay), **kw)
        torch.optim.lr_scheduler.StepLR = StepLR
""")

# Records the learning rate of every optimizer update the reference makes (a global post-step hook: observes, changes
# nothing), so that each run's table row shows whether and where its learning rate dropped.
_LR_RECORDER = textwrap.dedent("""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    learning_rates = []
    lr_hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: learning_rates.append(opt.param_groups[0]["lr"]))
""")

# Runs the reference's main() with its module constant `seed` set (the script has no flag for it), then
# reloads the models it saved and computes, with its own functions, the raw maps the table reports.
_REFERENCE_RUN = (
  textwrap.dedent("""
    import json
    sys.path.insert(0, sys.argv[1])
    import numpy as np, torch
    import efficientad as ref
    from common import ImageFolderWithoutTarget
    ref.seed = int(sys.argv[2])
    root, out_dir, teacher, steps, cat, decay = sys.argv[3:9]
""")
  + _DECAY_ABLATION
  + _LR_RECORDER
  + textwrap.dedent("""
    sys.argv = ["efficientad.py", "-d", "mvtec_ad", "-s", cat, "-o", out_dir, "-m", "small", "-w", teacher,
                "-i", "none", "-a", root, "-t", steps]
    ref.main()
    load = lambda n: torch.load(f"{out_dir}/trainings/mvtec_ad/{cat}/{n}_final.pth", weights_only=False)
    t, s, a = load("teacher"), load("student"), load("autoencoder")
    for m in (t, s, a):
        m.eval()
    full = ImageFolderWithoutTarget(f"{root}/{cat}/train", transform=torch.nn.Identity())
    n = len(full)
    train_idx, val_idx = torch.utils.data.random_split(range(n), [int(0.9 * n), n - int(0.9 * n)],
                                                       torch.Generator().manual_seed(ref.seed))
    batch = lambda path: ref.default_transform(__import__("PIL.Image").Image.open(path).convert("RGB"))[None]
    mean, std = ref.teacher_normalization(t, [(batch(full.samples[i][0]), None) for i in train_idx])
    val = [(batch(full.samples[i][0]), None) for i in val_idx]
    q = [float(v) for v in ref.map_normalization(val, t, s, a, mean, std)]
    test = ImageFolderWithoutTarget(f"{root}/{cat}/test")
    rows = []
    for path, _ in test.samples:
        _, m_st, m_ae = ref.predict(batch(path), t, s, a, mean, std)
        rows.append({"path": path, "st_max": float(m_st.max()), "ae_max": float(m_ae.max())})
    json.dump({"quantiles": q, "raw": rows, "validation": [full.samples[i][0] for i in val_idx],
               "learning_rates": learning_rates}, open(f"{out_dir}/raw_maps.json", "w"))
""")
)


def make_teacher(out: pathlib.Path, reference: pathlib.Path) -> pathlib.Path:
  """The shared random teacher: the reference's get_pdn_small(384) under torch.manual_seed(TEACHER_SEED)."""
  code = (
    f"{_TV_STUB}; import torch; sys.path.insert(0, sys.argv[1]); from common import get_pdn_small; "
    f"torch.manual_seed({TEACHER_SEED}); torch.save(get_pdn_small(384).state_dict(), sys.argv[2])"
  )
  pth = out / "teacher_small.pth"
  _run([sys.executable, "-c", code, str(reference), str(pth)])
  _run(
    [
      sys.executable,
      "-m",
      "experiments.import_teacher",
      str(pth),
      "--size",
      "small",
      "--out",
      str(out / "teacher"),
      "--force",
    ]
  )
  return pth


def run_reference(
  out: pathlib.Path, reference: pathlib.Path, seed: int, steps: int, tag: str = "", decay_factor: float | None = None
) -> pathlib.Path:
  """The reference's own script; `decay_factor` replaces its learning-rate decay factor (0.1) for an ablation
  (1.0: no decay), the run then tagged (`tag`) as our ablations are."""
  run, cat = out / f"reference{tag}_seed{seed}", category(out)
  if run.exists():
    raise SystemExit(f"error: {run} exists (the reference refuses an existing output folder): remove it")
  _run(
    [
      sys.executable,
      "-c",
      _TV_STUB + _REFERENCE_RUN,
      str(reference),
      str(seed),
      str(out / "mvtec"),
      str(run),
      str(out / "teacher_small.pth"),
      str(steps),
      cat,
      "" if decay_factor is None else str(decay_factor),
    ],
    cwd=reference,
  )
  raw = json.loads((run / "raw_maps.json").read_text())
  maps = run / "anomaly_maps" / "mvtec_ad" / cat / "test"
  result = _score(out, lambda rel: maps / rel.with_suffix(".tiff"), raw["raw"], raw["quantiles"])
  result.update(side="reference" + tag, seed=seed, steps=steps, validation=sorted(raw["validation"]))
  result["learning_rates"] = lr_changes(raw["learning_rates"])  # shows the ablation's factor too
  (run / "result.json").write_text(json.dumps(result, indent=2))
  return run


# --- This project.


def run_ours(out: pathlib.Path, seed: int, steps: int, overrides: list[str], tag: str = "") -> pathlib.Path:
  run, cat = out / f"ours{tag}_seed{seed}", category(out)
  sets = [
    f"data.root={out / 'mvtec'}",
    f"data.category={cat}",
    "data.penalty=",
    f"train.steps={steps}",
    f"train.seed={seed}",
    f"train.teacher_checkpoint={out / 'teacher'}",
    f"train.checkpoint_every={steps}",
    "train.log_every=50",
    *overrides,
  ]
  if not (run / "eval" / "metrics.json").exists():  # a finished run is only scored again
    _run(
      [
        sys.executable,
        "-m",
        "experiments.train",
        "--dataset",
        "mvtec_ad",
        "--workdir",
        str(run),
        *[a for s in sets for a in ("--set", s)],
      ]
    )
  raw, quantiles = _our_raw_maps(run)
  maps = run / "eval" / "anomaly_maps" / cat / "test"
  result = _score(out, lambda rel: maps / rel.with_suffix(".tiff"), raw, quantiles)
  result.update(side="ours" + tag, seed=seed, steps=steps, overrides=overrides)
  result["learning_rates"] = _our_learning_rates(run)
  (run / "result.json").write_text(json.dumps(result, indent=2))
  return run


def lr_changes(rates: list[float]) -> list[list]:
  """[[update index, learning rate], ...] at the first update and wherever the rate changes."""
  return [[i, float(r)] for i, r in enumerate(rates) if i == 0 or r != rates[i - 1]]


def _our_learning_rates(run: pathlib.Path) -> list[list]:
  """The learning rate of each of the run's updates, from its saved config by the schedule the trainer builds."""
  import jax.numpy as jnp

  from efficientad_jax.config import from_json
  from efficientad_jax.training import optim

  cfg = from_json((run / "config.json").read_text())
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
  return lr_changes(np.asarray(schedule(jnp.arange(cfg.train.steps))).tolist())


def _our_raw_maps(run: pathlib.Path) -> tuple[list[dict], list[float]]:
  from efficientad_jax import models
  from efficientad_jax.data import make_datasets
  from efficientad_jax.efficientad import inference
  from efficientad_jax.serving import predict

  model = predict.load(run)
  raw = inference.make_raw_maps_fn(models.build(model.cfg.model))
  ds = make_datasets(model.cfg.data, model.image_size, model.cfg.train.seed)
  rows = []
  for i in range(len(ds.test)):
    rec = ds.test[i]
    m_st, m_ae = raw(model.detector.params, model.detector.teacher_stats, rec["image"][None])
    rows.append({"path": rec["id"], "st_max": float(m_st.max()), "ae_max": float(m_ae.max())})
  q = model.detector.quantiles
  return rows, [float(v) for v in (q.st_start, q.st_end, q.ae_start, q.ae_end)]


# --- Cross-feed: the reference's networks and loop statements, fed either stream.


def cross_feed(
  out: pathlib.Path, reference: pathlib.Path, run: pathlib.Path, seed: int, steps: int, stream: str
) -> dict:
  """Trains the reference's networks with the reference's loop statements from torch.manual_seed(seed), on
  OUR training stream (`stream='ours'`: this project's grain pipeline of `run`) or on the reference's own
  DataLoader over the same training files (`'reference'`), then calibrates on `run`'s validation images with
  `run`'s teacher statistics. Equal quantiles from both streams mean the stream is not what separates the sides.
  """
  import itertools
  import types

  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("stub"))
  sys.path.insert(0, str(reference))
  import common  # the reference's networks
  import torch

  from efficientad_jax.data import make_datasets, preprocess
  from efficientad_jax.serving import predict

  model = predict.load(run)
  cfg, splits = model.cfg, json.loads((run / "splits.json").read_text())
  c = cfg.model.teacher_channels
  teacher = common.get_pdn_small(c)
  teacher.load_state_dict(torch.load(out / "teacher_small.pth"))
  teacher.eval()
  mean, std = (
    torch.tensor(np.asarray(v))[None, :, None, None]
    for v in (model.detector.teacher_stats.mean, model.detector.teacher_stats.std)
  )
  torch.manual_seed(seed)
  student, ae = common.get_pdn_small(2 * c), common.get_autoencoder(c)
  opt = torch.optim.Adam(
    itertools.chain(student.parameters(), ae.parameters()),
    lr=cfg.optim.learning_rate,
    weight_decay=cfg.optim.weight_decay,
  )
  sched = torch.optim.lr_scheduler.StepLR(
    opt, step_size=int(cfg.optim.decay_at_fraction * steps), gamma=cfg.optim.decay_factor
  )
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  # Our stream sends uint8 (the jitted step normalises): normalised here as the step does.
  as_input = lambda a: nchw(preprocess.network_input(a, cfg.data.mean, cfg.data.std))
  if stream == "ours":
    batches = (
      (as_input(b["image"]), as_input(b["image_ae"]))
      for b in make_datasets(cfg.data, cfg.model.image_size, cfg.train.seed).train_iter(1)
    )
  else:
    import efficientad

    files = splits["train"]
    pairs = torch.utils.data.DataLoader(
      files,
      batch_size=None,
      shuffle=True,
      collate_fn=lambda f: efficientad.train_transform(Image.open(f).convert("RGB")),
    )
    batches = ((x[None], x_ae[None]) for x, x_ae in common.InfiniteDataloader(pairs))
  student.train()
  ae.train()
  for x, x_ae in itertools.islice(batches, steps):
    with torch.no_grad():
      t, t_ae = (teacher(x) - mean) / std, (teacher(x_ae) - mean) / std
    d = (t - student(x)[:, :c]) ** 2
    loss_hard = torch.mean(d[d >= torch.quantile(d, cfg.loss.hard_quantile)])
    a = ae(x_ae)
    loss = loss_hard + torch.mean((t_ae - a) ** 2) + torch.mean((a - student(x_ae)[:, c:]) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
  student.eval()
  ae.eval()
  maps_st, maps_ae = [], []
  with torch.no_grad():
    for path in splits["validation"]:
      x = nchw(
        preprocess.model_input(preprocess.decode_image(path), cfg.model.image_size, cfg.data.mean, cfg.data.std)[None]
      )
      t, s, a = (teacher(x) - mean) / std, student(x), ae(x)
      maps_st.append(((t - s[:, :c]) ** 2).mean(1).numpy())
      maps_ae.append(((a - s[:, c:]) ** 2).mean(1).numpy())
  return {
    "stream": stream,
    "torch_seed": seed,
    "steps": steps,
    "run": str(run),
    "q_st": np.quantile(np.concatenate(maps_st), [0.9, 0.995]).tolist(),
    "q_ae": np.quantile(np.concatenate(maps_ae), [0.9, 0.995]).tolist(),
  }


# --- Scoring (the same code for both sides).


def image_key(path) -> str:
  """'<defect type>/<stem>' of a test image's path: how both sides' per-image rows are matched."""
  return "/".join(pathlib.Path(path).parts[-2:]).removesuffix(".png")


def _score(out: pathlib.Path, map_path, raw: list[dict], quantiles: list[float]) -> dict:
  """Image AU-ROC and AU-PRO@0.3 of the full-resolution maps; image AU-ROC of each raw map's maximum."""
  import tifffile

  from efficientad_jax.metrics import au_pro, auroc, image_auroc

  base = out / "mvtec" / category(out)
  maps, masks, labels = [], [], []
  for img in sorted((base / "test").glob("*/*.png")):
    rel = img.relative_to(base / "test")
    maps.append(tifffile.imread(map_path(rel)).astype(np.float32))
    defect = rel.parent.name
    gt = base / "ground_truth" / defect / f"{img.stem}_mask.png"
    masks.append(np.asarray(Image.open(gt)) > 0 if defect != "good" else np.zeros(maps[-1].shape, bool))
    labels.append(int(defect != "good"))
  by_name = {image_key(r["path"]): r for r in raw}
  keys = [image_key(p) for p in sorted((base / "test").glob("*/*.png"))]
  rows = [by_name[k] for k in keys]
  labels = np.asarray(labels)
  return {
    "image_auroc": image_auroc(maps, labels),
    "au_pro_0.3": au_pro(maps, masks, (0.3,))[0.3],
    "st_raw_auroc": auroc(np.array([r["st_max"] for r in rows]), labels),
    "ae_raw_auroc": auroc(np.array([r["ae_max"] for r in rows]), labels),
    "q_st": quantiles[:2],
    "q_ae": quantiles[2:],
  }


def branch_losses(out: pathlib.Path) -> list[dict]:
  """Per finished run, how far each branch has learned, measured the same way for both sides: each side's own
  networks and teacher statistics on the same normal images (all of train/good, which both sides trained on
  but for their 8 validation images, and test/good, which neither saw), through this project's networks (the
  reference's saved modules converted; its teacher statistics refitted on its own training split, the files its
  raw_maps.json does not list as validation).

  l_ae = mean (T_hat - A)^2: 1.0 is an autoencoder that outputs each channel's mean (the plateau of BUILD_NOTES
  "The autoencoder branch"); ae_structure = mean_c var_hw(A) / mean_c var_hw(T_hat): the share of each image's
  spatial structure the autoencoder reproduces; l_stae = mean (A - S_ae)^2 (what q_ae calibrates);
  l_st = mean (T_hat - S_st)^2.
  """
  import jax
  import jax.numpy as jnp

  from efficientad_jax import models
  from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
  from efficientad_jax.data import preprocess
  from efficientad_jax.efficientad import normalization
  from efficientad_jax.serving import predict

  base = out / "mvtec" / category(out)
  good, train = (sorted((base / folder / "good").glob("*.png")) for folder in ("test", "train"))
  model_cfg = ModelConfig()
  load = lambda paths: np.stack(
    [
      preprocess.model_input(preprocess.decode_image(f), model_cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
      for f in paths
    ]
  )
  sets = {"train": load(train), "good": load(good)}
  nets = models.build(model_cfg)

  @jax.jit
  def losses(params, stats, x):
    c = nets.teacher.out_channels
    t = normalization.normalize_teacher(nets.teacher.apply({"params": params["teacher"]}, x), stats)
    s = nets.student.apply({"params": params["student"]}, x)
    a = nets.autoencoder.apply({"params": params["autoencoder"]}, x, deterministic=True)
    spatial_var = lambda v: jnp.mean(jnp.var(v, axis=(1, 2)))
    return {
      "l_st": jnp.mean(jnp.square(t - s[..., :c])),
      "l_ae": jnp.mean(jnp.square(t - a)),
      "l_stae": jnp.mean(jnp.square(a - s[..., c:])),
      "ae_structure": spatial_var(a) / spatial_var(t),
    }

  rows = []
  for result in sorted(out.glob("*/result.json")):
    run, meta = result.parent, json.loads(result.read_text())
    if meta["side"].startswith("reference"):
      params, stats = _reference_params(run, nets, base.name, train, sets["train"])
    else:
      model = predict.load(run)
      params, stats = model.detector.params, model.detector.teacher_stats
    row = {"side": meta["side"], "seed": meta["seed"]}
    for name, x in sets.items():
      per_image = [losses(params, stats, image[None]) for image in x]
      row.update({f"{k}_{name}": float(np.mean([r[k] for r in per_image])) for k in per_image[0]})
    rows.append(row)
  return rows


def _reference_params(
  run: pathlib.Path, nets, cat: str, train: list[pathlib.Path], train_x: np.ndarray
) -> tuple[dict, object]:
  """The reference run's saved modules as Flax params, and its teacher statistics refitted on its training split
  (`train_x`: the network inputs of all `train` images, in that order)."""
  import jax
  import torch

  from efficientad_jax.efficientad import normalization
  from efficientad_jax.models import weights

  saved = run / "trainings" / "mvtec_ad" / cat
  state = lambda n: {
    k: v.numpy() for k, v in torch.load(saved / f"{n}_final.pth", weights_only=False).state_dict().items()
  }
  params = {
    "teacher": weights.pdn_params_from_state(state("teacher"), "small"),
    "student": weights.pdn_params_from_state(state("student"), "small"),
    "autoencoder": weights.autoencoder_params_from_state(state("autoencoder")),
  }
  held_out = {pathlib.Path(p).name for p in json.loads((run / "raw_maps.json").read_text())["validation"]}
  x = train_x[[i for i, f in enumerate(train) if f.name not in held_out]]
  features = jax.jit(lambda b: nets.teacher.apply({"params": params["teacher"]}, b))
  stats = normalization.fit_teacher_stats(features, lambda: (x[i : i + 8] for i in range(0, len(x), 8)))
  return params, stats


def branch_table(rows: list[dict]) -> str:
  keys = (
    "l_ae_train",
    "ae_structure_train",
    "l_stae_train",
    "l_ae_good",
    "ae_structure_good",
    "l_stae_good",
    "l_st_good",
  )
  lines = ["| side | seed | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  for r in sorted(rows, key=lambda r: (r["side"], r["seed"])):
    lines.append(f"| {r['side']} | {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
  return "\n".join(lines)


def type_aurocs(rows: list[dict]) -> dict[str, float]:
  """{'<branch>:<defect type>': image AU-ROC of good against that type alone} from per-image raw map maxima
  rows {'key': '<type>/<stem>', 'st': ..., 'ae': ...} (keys of good images start with 'good/')."""
  from efficientad_jax.metrics import auroc

  kind = lambda r: r["key"].split("/")[0]
  good = [r for r in rows if kind(r) == "good"]
  result = {}
  for branch in ("ae", "st"):
    for defect in sorted({kind(r) for r in rows} - {"good"}):
      bad = [r for r in rows if kind(r) == defect]
      labels = np.array([0] * len(good) + [1] * len(bad))
      result[f"{branch}:{defect}"] = auroc(np.array([r[branch] for r in good + bad]), labels)
  return result


def type_table(out: pathlib.Path) -> str:
  """Each run's raw maps by defect type; the per-image maxima are kept in out/raw_maxima.json (ours are computed
  once, the reference's come from its raw_maps.json)."""
  cache = out / "raw_maxima.json"
  maxima = json.loads(cache.read_text()) if cache.exists() else {}
  rows = []
  for result in sorted(out.glob("*/result.json")):
    run, meta = result.parent, json.loads(result.read_text())
    if run.name not in maxima:
      raw = (
        json.loads((run / "raw_maps.json").read_text())["raw"]
        if meta["side"].startswith("reference")
        else _our_raw_maps(run)[0]
      )
      keys = [image_key(r["path"]) for r in raw]
      maxima[run.name] = [{"key": k, "st": r["st_max"], "ae": r["ae_max"]} for k, r in zip(keys, raw)]
      cache.write_text(json.dumps(maxima))
    rows.append((meta["side"], meta["seed"], type_aurocs(maxima[run.name])))
  columns = list(rows[0][2]) if rows else []
  lines = ["| side | seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
  for side, seed, values in sorted(rows, key=lambda r: (r[0], r[1])):
    lines.append(f"| {side} | {seed} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
  return "\n".join(lines)


def lr_text(changes: list[list] | None) -> str:
  """'1e-04; 1e-05 from 950': the learning rate of the first update and each change (update index, 0-based)."""
  if changes is None:  # a run scored before the learning rates were recorded
    return "not recorded"
  return "; ".join(f"{lr:.0e}" + (f" from {i}" if i else "") for i, lr in changes)


def table(out: pathlib.Path) -> str:
  results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
  lines = [
    "| side | seed | steps | learning rate | image AU-ROC | AU-PRO@0.3 | local raw | global raw | "
    "q_st (0.9/0.995) | q_ae (0.9/0.995) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(results, key=lambda r: (r["side"], r["seed"])):
    lines.append(
      f"| {r['side']} | {r['seed']} | {r['steps']} | {lr_text(r.get('learning_rates'))} | "
      f"{r['image_auroc']:.3f} | {r['au_pro_0.3']:.3f} | "
      f"{r['st_raw_auroc']:.3f} | {r['ae_raw_auroc']:.3f} | {r['q_st'][0]:.4f} / {r['q_st'][1]:.4f} | "
      f"{r['q_ae'][0]:.4f} / {r['q_ae'][1]:.4f} |"
    )
  sides = sorted({r["side"] for r in results})
  for side in sides:
    v = np.array([r["image_auroc"] for r in results if r["side"] == side])
    p = np.array([r["au_pro_0.3"] for r in results if r["side"] == side])
    lines.append(
      f"| **{side} mean** ({len(v)} seeds) | | | | {v.mean():.3f} (min {v.min():.3f}, max {v.max():.3f}) | "
      f"{p.mean():.3f} | | | | |"
    )
  return "\n".join(lines)


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> None:
  repo = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run(cmd, cwd=cwd or repo, check=False)
  if done.returncode:
    raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {done.returncode}")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("what", choices=("data", "reference", "ours", "crossfeed", "table", "branches", "types"))
  p.add_argument("--out", required=True, type=pathlib.Path, help="working folder (data, teacher, runs)")
  p.add_argument("--reference", type=pathlib.Path, help="a checkout of nelson1425/EfficientAD")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--tag", default="", help="suffix of the run folder and side (ablations)")
  p.add_argument(
    "--decay-factor", type=float, help="reference: its learning-rate decay factor instead of 0.1 (ablations)"
  )
  p.add_argument("--run", type=pathlib.Path, help="crossfeed: our finished run whose stream and validation to use")
  p.add_argument("--stream", choices=("ours", "reference"), default="ours", help="crossfeed: which stream")
  p.add_argument("--set", action="append", default=[], help="config override for our side")
  p.add_argument("--photo", default=PHOTO, help="data: the scikit-image photograph to crop (e.g. brick.png)")
  args = p.parse_args(argv)
  out = args.out.absolute()
  if args.what in ("data", "reference", "crossfeed") and not args.reference:
    p.error("--reference DIR (a checkout of nelson1425/EfficientAD) is needed")
  if args.what == "data":
    make_dataset(out, photo_name=args.photo)
    make_teacher(out, args.reference.absolute())
  elif args.what == "reference":
    run_reference(out, args.reference.absolute(), args.seed, args.steps, args.tag, args.decay_factor)
  elif args.what == "ours":
    run_ours(out, args.seed, args.steps, args.set, args.tag)
  elif args.what == "crossfeed":
    if not args.run:
      p.error("crossfeed needs --run RUN (one of our finished runs)")
    result = cross_feed(out, args.reference.absolute(), args.run.absolute(), args.seed, args.steps, args.stream)
    print(json.dumps(result))
    return 0
  elif args.what == "types":
    print(type_table(out))
    return 0
  elif args.what == "branches":
    rows = branch_losses(out)
    (out / "branches.json").write_text(json.dumps(rows, indent=2))
    print(branch_table(rows))
    return 0
  print(table(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
