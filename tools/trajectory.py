"""Many training steps WITH the autoencoder's dropout, this project against PyTorch, from identical weights on
identical batches (docs/method.md §5-§6; BUILD_NOTES.md, "The autoencoder branch").

Both sides start from the same random networks (built in PyTorch by `experiments.torch_reference`, copied into
Flax), see the same normal and colour-jittered images per step (crops of a scikit-image photograph, or uniform
noise) and the same random teacher statistics. The dropout masks are either

  --masks shared   drawn once in NumPy and injected into both sides: into PyTorch by replacing the autoencoder's
                   Dropout module, into this project's own compiled train step (`train_step.train_step`) by a
                   `flax.linen.intercept_methods` hook on `nn.Dropout`; the two runs must then agree within float
                   drift (losses per step, parameters and the raw autoencoder-map quantile q_ae at the end);
  --masks own      each side draws its own (torch.nn.Dropout, flax's nn.Dropout): the spread over seeds shows
                   whether the implementations' own masks train differently.

  python -m tools.trajectory --steps 200 --image-size 64 --masks shared --out /tmp/traj_shared.json
  python -m tools.trajectory --steps 600 --image-size 128 --masks own --seeds 0-4 --out /tmp/traj_own.json
  python -m tools.trajectory --steps 1000 --image-size 128 --masks own --init own --q-every 100 --out /tmp/q.json

`--q-every N` also records both sides' held-out quantiles after every N-th step (q_ae along the plateau).
`--photo NAME` crops another of scikit-image's bundled photographs (default ihc.png; e.g. grass.png, brick.png).

Needs torch (a test dependency) and, for photograph data, scikit-image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from efficientad_jax import models
from efficientad_jax.config import IMAGENET_MEAN, IMAGENET_STD, Config, LossConfig, ModelConfig
from efficientad_jax.data import preprocess
from efficientad_jax.efficientad import inference, normalization, train_step
from efficientad_jax.training import optim, parallel
from experiments import torch_reference
from tools.side_by_side import PHOTO, skimage_photo

PDN_NAMES = tuple(f"conv{i}" for i in range(1, 5))
AE_NAMES = tuple(f"enc{i}" for i in range(1, 7)) + tuple(f"dec{i}" for i in range(1, 9))
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


# --- Inputs shared by both sides.


def dropout_shapes(image_size: int) -> list[tuple[int, int, int]]:
  """(H, W, C) of the six dropped decoder activations: conv k4 p2 after a resize to s gives s + 1."""
  return [(s + 1, s + 1, 64) for s in models.decoder_sizes(image_size)]


def draw_masks(rng: np.random.Generator, image_size: int, rate: float) -> list[np.ndarray]:
  """One step's six keep-masks, [1, H, W, C] bool, each element kept with probability 1 - rate."""
  return [rng.uniform(size=(1, *shape)) >= rate for shape in dropout_shapes(image_size)]


def photo_images(count: int, size: int, seed: int, *, photo_name: str = PHOTO, crop: int = 192) -> list[np.ndarray]:
  """`count` random crops of a photograph bundled with scikit-image (by default the immunohistochemistry one, a
  real texture), RGB uint8."""
  photo = np.asarray(skimage_photo(photo_name))
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    y, x = (int(rng.integers(0, n - crop + 1)) for n in photo.shape[:2])
    out.append(photo[y : y + crop, x : x + crop])
  return out


def batches(images: list[np.ndarray], size: int, steps: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(normal, jittered) normalised float32 [1, size, size, 3] pairs, the images cycled in a seeded order."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    img = images[int(rng.integers(len(images)))]
    kind, factor = preprocess.draw_jitter(rng, 0.8, 1.2)
    yield (
      preprocess.model_input(img, size, MEAN, STD)[None],
      preprocess.autoencoder_input(img, kind, factor, size, MEAN, STD)[None],
    )


def fitted_stats(teacher: torch.nn.Module, images: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
  """The teacher's channel mean and standard deviation over `images`, fitted by the library's own
  `normalization.fit_teacher_stats` as a run fits them (docs/method.md §5.1): the normalised targets then have
  unit variance per channel, most of it the images' spatial structure."""
  x = np.stack([preprocess.model_input(i, size, MEAN, STD) for i in images])

  def features(batch: np.ndarray) -> np.ndarray:  # NHWC in, NHWC out, as the library's teacher
    with torch.no_grad():
      out = teacher(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))))
    return out.numpy().transpose(0, 2, 3, 1)

  stats = normalization.fit_teacher_stats(features, lambda: [x])
  return np.asarray(stats.mean), np.asarray(stats.std)


def noise_images(count: int, size: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


# --- PyTorch.


class _InjectedDropout(torch.nn.Module):
  """Stands in for the autoencoder's Dropout: multiplies by the next injected keep-mask / (1 - rate)."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate, self.masks = rate, []

  def forward(self, x):
    mask = torch.from_numpy(self.masks.pop(0).transpose(0, 3, 1, 2))
    return x * mask / (1 - self.rate)


def _torch_to_flax(module: torch.nn.Module, names) -> dict:
  convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
  return {
    n: {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0).copy(), "bias": c.bias.detach().numpy().copy()}
    for n, c in zip(names, convs)
  }


def torch_nets(image_size: int, seed: int):
  torch.manual_seed(seed)
  return torch_reference.build_torch_models("small", image_size)


def _probe_every(every: int, record: Callable[[dict], dict], into: dict) -> Callable[[int, Callable[[], dict]], None]:
  """A probe that stores `record(params)` under the step number (1-based) after every `every`-th step; the
  parameters are fetched only then."""

  def probe(i: int, params: Callable[[], dict]) -> None:
    if every and (i + 1) % every == 0:
      into[str(i + 1)] = record(params())

  return probe


def torch_run(
  nets,
  stats,
  data,
  masks,
  cfg: Config,
  steps: int,
  on_step: Callable[[int], None] = lambda i: None,
  probe: Callable[[int, Callable[[], dict]], None] | None = None,
) -> tuple[np.ndarray, dict]:
  """The reference loop (penalty off): per-step [loss_hard, loss_ae, loss_stae] and the end parameters (Flax
  layout). `masks` None: the autoencoder's own torch.nn.Dropout. `probe(i, params)` is called after every step i
  with a function that returns the parameters then (Flax layout)."""
  teacher, student, ae = nets
  teacher.eval(), student.train(), ae.train()
  if masks is not None:
    ae.drop = _InjectedDropout(cfg.model.ae_dropout)
  c = cfg.model.teacher_channels
  mean, std = (torch.from_numpy(v)[None, :, None, None] for v in stats)
  opt = torch.optim.Adam(
    itertools.chain(student.parameters(), ae.parameters()),
    lr=cfg.optim.learning_rate,
    weight_decay=cfg.optim.weight_decay,
  )
  sched = torch.optim.lr_scheduler.StepLR(
    opt, step_size=int(cfg.optim.decay_at_fraction * steps), gamma=cfg.optim.decay_factor
  )
  losses = []
  for i, (x, x_ae) in enumerate(data):
    if masks is not None:
      ae.drop.masks = list(masks[i])
    x, x_ae = (torch.from_numpy(v.transpose(0, 3, 1, 2)) for v in (x, x_ae))
    with torch.no_grad():
      t, t_ae = (teacher(x) - mean) / std, (teacher(x_ae) - mean) / std
    d = (t - student(x)[:, :c]) ** 2
    loss_hard = torch.mean(d[d >= torch.quantile(d, cfg.loss.hard_quantile)])
    a = ae(x_ae)
    loss_ae = torch.mean((t_ae - a) ** 2)
    loss_stae = torch.mean((a - student(x_ae)[:, c:]) ** 2)
    opt.zero_grad()
    (loss_hard + loss_ae + loss_stae).backward()
    opt.step()
    sched.step()
    losses.append([v.item() for v in (loss_hard, loss_ae, loss_stae)])
    on_step(i)
    if probe is not None:
      probe(i, lambda: _torch_params(student, ae))
  return np.asarray(losses), _torch_params(student, ae)


def _torch_params(student: torch.nn.Module, ae: torch.nn.Module) -> dict:
  return {"student": _torch_to_flax(student, PDN_NAMES), "autoencoder": _torch_to_flax(ae, AE_NAMES)}


# --- This project.


def mask_hook(queue: list[jnp.ndarray], rate: float):
  """An interceptor that replaces each nn.Dropout call by the next keep-mask popped from `queue` (in call
  order), scaled by 1 / (1 - rate) like nn.Dropout."""

  def hook(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
      return jnp.where(queue.pop(0), args[0] / (1 - rate), jnp.zeros_like(args[0]))
    return next_fun(*args, **kwargs)

  return hook


def ours_run(
  start: dict,
  teacher: dict,
  stats,
  data,
  masks,
  cfg: Config,
  steps: int,
  seed: int,
  on_step: Callable[[int], None] = lambda i: None,
  probe: Callable[[int, Callable[[], dict]], None] | None = None,
) -> tuple[np.ndarray, dict]:
  """This project's `train_step.train_step` from `start`; `masks` None: flax's own dropout with the run key
  `jax.random.key(seed)` (fold_in of the step, as the trainer does). `probe` as in `torch_run`."""
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, steps)
  state = train_step.init_state(jax.tree_util.tree_map(jnp.asarray, start), tx)
  frozen = train_step.Frozen(teacher=teacher, stats=normalization.TeacherStats(*(jnp.asarray(v) for v in stats)))
  mesh = parallel.data_mesh(jax.devices()[:1])
  key = jax.random.key(seed)

  if masks is None:
    step = train_step.compile_train_step(nets, cfg, tx, mesh)
    run = lambda state, batch, _: step(state, frozen, parallel.shard_batch(batch, mesh), key)
  else:

    @jax.jit
    def injected(state, frozen, batch, key, step_masks):
      with nn.intercept_methods(mask_hook(list(step_masks), cfg.model.ae_dropout)):
        return train_step.train_step(nets, cfg, tx, state, frozen, batch, key)

    run = lambda state, batch, i: injected(state, frozen, batch, key, list(masks[i]))
  losses = []
  for i, (x, x_ae) in enumerate(data):
    state, out = run(state, {"image": x, "image_ae": x_ae}, i)
    losses.append([float(out[k]) for k in ("loss_hard", "loss_ae", "loss_stae")])
    on_step(i)
    if probe is not None:
      probe(i, lambda state=state: jax.tree_util.tree_map(np.asarray, state.params))
  return np.asarray(losses), jax.tree_util.tree_map(np.asarray, state.params)


# --- The comparison.


def ae_quantiles(cfg: Config, teacher: dict, stats, params: dict, images: list[np.ndarray]) -> dict:
  """q_st, q_ae (0.9 / 0.995) of the raw maps on `images`: the library's `inference.raw_maps` and calibration's
  `fit_map_quantiles`, as a saved model's quantiles are made."""
  nets = models.build(cfg.model)
  x = jnp.asarray(np.concatenate([preprocess.model_input(i, cfg.model.image_size, MEAN, STD)[None] for i in images]))
  both = {"teacher": teacher, **params}
  m_st, m_ae = inference.raw_maps(nets, both, normalization.TeacherStats(*(jnp.asarray(v) for v in stats)), x)
  q = normalization.fit_map_quantiles(np.asarray(m_st), np.asarray(m_ae), 0.9, 0.995)
  return {"q_st": [float(q.st_start), float(q.st_end)], "q_ae": [float(q.ae_start), float(q.ae_end)]}


def rel_param_diff(ours: dict, theirs: dict, start: dict) -> dict:
  """Per network: max over tensors of |ours - theirs| / |theirs - start| (L2 norms)."""
  out = {}
  for net in ("student", "autoencoder"):
    ratios = []
    for layer, leaves in theirs[net].items():
      for name, ref in leaves.items():
        moved = np.linalg.norm(ref - start[net][layer][name])
        ratios.append(float(np.linalg.norm(ours[net][layer][name] - ref) / max(moved, 1e-12)))
    out[net] = max(ratios)
  return out


def compare(
  image_size: int,
  steps: int,
  seed: int,
  masks_mode: str,
  data: str = "photo",
  hard_quantile: float = 0.999,
  init: str = "shared",
  progress: bool = False,
  stats_mode: str = "random",
  q_every: int = 0,
  photo_name: str = PHOTO,
) -> dict:
  """One side-by-side trajectory; returns losses per step of both sides, parameter differences and quantiles.

  init "shared": both sides start from PyTorch's initialisation; "own": this project starts from its own
  (`models.init_params` with key `seed`), so the two runs share only the teacher, its statistics and the data.
  stats_mode "random": teacher statistics drawn at random (mean ~ N(0, 1), std ~ U(0.5, 2)); the random teacher's
  outputs vary by ~0.02, so the normalised targets are then nearly constant per channel, enough to compare two
  implementations step by step but not what a run trains on. "fitted": fitted on the training images
  (`fitted_stats`), the targets of a real run. q_every > 0: the held-out quantiles of both sides also after every
  q_every-th step (`quantiles_every`: step -> q_st, q_ae), to follow q_ae along the autoencoder's plateau.
  """
  cfg = Config(model=ModelConfig(image_size=image_size), loss=LossConfig(hard_quantile=hard_quantile))
  t_teacher, t_student, t_ae = torch_nets(image_size, seed)
  start = {"student": _torch_to_flax(t_student, PDN_NAMES), "autoencoder": _torch_to_flax(t_ae, AE_NAMES)}
  torch_start = start
  if init == "own":
    fresh = models.init_params(models.build(cfg.model), jax.random.key(seed), image_size)
    start = jax.tree_util.tree_map(np.asarray, {k: fresh[k] for k in ("student", "autoencoder")})
  teacher = _torch_to_flax(t_teacher, PDN_NAMES)
  rng = np.random.default_rng(seed)
  c = cfg.model.teacher_channels
  stats = (rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2.0, size=c).astype(np.float32))
  images = (
    photo_images(48, image_size, seed, photo_name=photo_name) if data == "photo" else noise_images(48, image_size, seed)
  )
  train_images, held_out = images[:40], images[40:]
  if stats_mode == "fitted":
    stats = fitted_stats(t_teacher, train_images, image_size)
  masks = [draw_masks(rng, image_size, cfg.model.ae_dropout) for _ in range(steps)] if masks_mode == "shared" else None
  tick = _progress(steps) if progress else (lambda i: None)
  record = lambda params: ae_quantiles(cfg, teacher, stats, params, held_out)
  along = {"torch": {}, "ours": {}}
  t0 = time.time()
  theirs, theirs_end = torch_run(
    (t_teacher, t_student, t_ae),
    stats,
    batches(train_images, image_size, steps, seed),
    masks,
    cfg,
    steps,
    tick,
    _probe_every(q_every, record, along["torch"]),
  )
  t1 = time.time()
  ours, ours_end = ours_run(
    start,
    teacher,
    stats,
    batches(train_images, image_size, steps, seed),
    masks,
    cfg,
    steps,
    seed,
    tick,
    _probe_every(q_every, record, along["ours"]),
  )
  t2 = time.time()
  return {
    "image_size": image_size,
    "steps": steps,
    "seed": seed,
    "masks": masks_mode,
    "data": data if data == "noise" else f"photo {photo_name}",
    "hard_quantile": hard_quantile,
    "seconds": {"torch": t1 - t0, "ours": t2 - t1},
    "losses": {"torch": theirs.tolist(), "ours": ours.tolist()},
    "max_rel_loss_diff": np.max(np.abs(ours - theirs) / np.abs(theirs), axis=0).tolist(),
    "init": init,
    "stats": stats_mode,
    "param_rel_diff": rel_param_diff(ours_end, theirs_end, torch_start),
    "quantiles": {  # the last probe's, when it saw the end parameters
      side: along[side].get(str(steps)) or record(end) for side, end in (("torch", theirs_end), ("ours", ours_end))
    },
    "quantiles_every": along,
  }


def autoencoder_only(image_size: int, steps: int, seed: int, init: str = "own") -> dict:
  """The autoencoder alone, trained on L_ae by both implementations (fitted statistics, own dropout masks): per-step
  losses of each side. The cheap way to see when each autoencoder leaves the plateau where it outputs each channel's
  mean (loss_ae ~ 1 on unit-variance targets) and starts to reconstruct: in the full step that escape decides how
  much the autoencoder branch has learned. The student is left out; L_stae is small next to L_ae on the plateau.

  init "own": this project's initialisation (key `seed`); "shared": PyTorch's, copied.
  """
  cfg = Config(model=ModelConfig(image_size=image_size))
  t_teacher, _, t_ae = torch_nets(image_size, seed)
  images = photo_images(40, image_size, seed)
  stats = fitted_stats(t_teacher, images, image_size)
  mean, std = (torch.from_numpy(v)[None, :, None, None] for v in stats)
  inputs = [torch.from_numpy(x_ae.transpose(0, 3, 1, 2)) for _, x_ae in batches(images, image_size, steps, seed)]
  with torch.no_grad():
    targets = [(t_teacher(x) - mean) / std for x in inputs]

  t_ae.train()
  opt = torch.optim.Adam(t_ae.parameters(), lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
  theirs = []
  for x, t in zip(inputs, targets):
    loss = torch.mean((t - t_ae(x)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    theirs.append(loss.item())

  nets = models.build(cfg.model)
  if init == "own":
    params = models.init_params(nets, jax.random.key(seed), image_size)["autoencoder"]
  else:  # the PyTorch side's initial weights (rebuilt from the seed: its module has trained since)
    params = jax.tree_util.tree_map(jnp.asarray, _torch_to_flax(torch_nets(image_size, seed)[2], AE_NAMES))
  tx = optim.make_optimizer(cfg.optim, 10 * steps)  # no decay within the run, as the PyTorch side
  key = jax.random.key(seed)

  @jax.jit
  def step(params, opt_state, x, t, i):
    def loss_fn(p):
      a = nets.autoencoder.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.fold_in(key, i)})
      return jnp.mean(jnp.square(t - a))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, ours = tx.init(params), []
  for i, (x, t) in enumerate(zip(inputs, targets)):
    params, opt_state, loss = step(
      params, opt_state, x.numpy().transpose(0, 2, 3, 1), t.numpy().transpose(0, 2, 3, 1), i
    )
    ours.append(float(loss))
  return {
    "image_size": image_size,
    "steps": steps,
    "seed": seed,
    "init": init,
    "losses": {"torch": theirs, "ours": ours},
  }


def plateau(result: dict, window: int = 25, drop: float = 0.9) -> dict:
  """Per side: the first step whose `window`-step mean of loss_ae is below `drop` x the mean over the first 100
  steps (the autoencoder has left the plateau; None if never), and the mean loss over the last `window` steps."""
  out = {}
  for side, losses in result["losses"].items():
    v = np.asarray(losses)
    means = np.convolve(v, np.ones(window) / window, mode="valid")
    below = np.flatnonzero(means < drop * v[:100].mean())
    out[side] = {
      "escape_step": int(below[0] + window - 1) if below.size else None,
      "last_mean": float(v[-window:].mean()),
    }
  return out


def _progress(steps: int) -> Callable[[int], None]:
  def tick(i):
    if (i + 1) % max(1, steps // 4) == 0:
      print(f"  step {i + 1}/{steps}", flush=True)

  return tick


def _seeds(text: str) -> list[int]:
  if "-" in text:
    lo, hi = text.split("-")
    return list(range(int(lo), int(hi) + 1))
  return [int(s) for s in text.split(",")]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seeds", default="0")
  p.add_argument("--masks", choices=("shared", "own"), default="shared")
  p.add_argument("--data", choices=("photo", "noise"), default="photo")
  p.add_argument("--photo", default=PHOTO, help="with --data photo: a photograph's file name in skimage/data")
  p.add_argument("--hard-quantile", type=float, default=0.999)
  p.add_argument("--init", choices=("shared", "own"), default="shared")
  p.add_argument("--stats", choices=("random", "fitted"), default="fitted", help="teacher statistics (`compare`)")
  p.add_argument(
    "--networks", choices=("all", "autoencoder"), default="all", help="autoencoder: `autoencoder_only` (own masks)"
  )
  p.add_argument("--q-every", type=int, default=0, help="also the held-out quantiles after every N-th step")
  p.add_argument("--out", type=pathlib.Path, required=True)
  args = p.parse_args(argv)
  torch.set_num_threads(1)
  results = []
  for seed in _seeds(args.seeds):
    if args.networks == "autoencoder":
      results.append(autoencoder_only(args.image_size, args.steps, seed, args.init))
      print(json.dumps({"seed": seed, **plateau(results[-1])}), flush=True)
      args.out.write_text(json.dumps(results))
      continue
    r = compare(
      args.image_size,
      args.steps,
      seed,
      args.masks,
      args.data,
      args.hard_quantile,
      args.init,
      True,
      args.stats,
      args.q_every,
      args.photo,
    )
    results.append(r)
    print(
      json.dumps({k: r[k] for k in ("seed", "max_rel_loss_diff", "param_rel_diff", "quantiles", "seconds")}), flush=True
    )
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
  main()
