"""Training over many steps against PyTorch (issue 20): the parts the one-step fixture does not cover.

* the autoencoder's dropout: rate, inverted scaling and placement, against `torch.nn.Dropout`;
* Adam with coupled L2 weight decay and the step learning-rate drop over 60 steps, against
  `torch.optim.Adam` + `StepLR` fed the same gradients;
* a multi-step training trajectory (dropout off) against a PyTorch run of the same networks from identical
  weights on identical batches: losses at every step and the parameters at the end.
The PyTorch networks are the project's own torch.nn transcription of docs/method.md (experiments/torch_reference.py).
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from efficientad_jax import models, normalization, optim, parallel, train_step, weights
from efficientad_jax.config import Config, LossConfig, ModelConfig, OptimConfig
from experiments import torch_reference

torch.set_num_threads(1)


# --- Dropout.


def _dropout_calls(nets, params, x, key):
  """[(layer name, input, output)] of every nn.Dropout call, and {conv name: output} of every conv."""
  calls, convs = [], {}

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
      calls.append((context.module.name, np.asarray(args[0]), np.asarray(out)))
    elif isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      convs[context.module.name] = np.asarray(out)
    return out

  with nn.intercept_methods(spy):
    nets.autoencoder.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
  return calls, convs


def _binomial_ok(dropped: int, total: int, rate: float) -> bool:
  return abs(dropped - rate * total) <= 5 * np.sqrt(total * rate * (1 - rate))


def test_autoencoder_dropout_matches_torch_semantics():
  cfg = ModelConfig(image_size=128)
  nets = models.build(cfg)
  params = models.init_params(nets, jax.random.key(0), cfg.image_size)["autoencoder"]
  x = jax.random.normal(jax.random.key(1), (1, cfg.image_size, cfg.image_size, 3))
  calls, convs = _dropout_calls(nets, params, x, jax.random.key(2))

  # Placement: after the ReLU of each of the six decoder convs, in order, and nowhere else.
  assert len(calls) == 6
  for i, (_, inp, _) in enumerate(calls, start=1):
    np.testing.assert_array_equal(inp, np.maximum(convs[f"dec{i}"], 0))

  torch.manual_seed(0)
  reference = torch.nn.Dropout(cfg.ae_dropout).train()
  masks = []
  for _, inp, out in calls:
    ref = reference(torch.from_numpy(inp)).numpy()
    for got in (out, ref):
      kept = got != 0
      live = inp != 0
      # Inverted dropout: kept values are scaled by exactly 1 / (1 - rate); the rest are zero.
      np.testing.assert_allclose(got[kept], inp[kept] / np.float32(1 - cfg.ae_dropout), rtol=1e-6)
      assert _binomial_ok(int(np.count_nonzero(live & ~kept)), int(np.count_nonzero(live)), cfg.ae_dropout)
    masks.append(out != 0)
  # Independent masks: a second key drops other units.
  calls_2, _ = _dropout_calls(nets, params, x, jax.random.key(3))
  assert not np.array_equal(calls_2[-1][2] != 0, masks[-1])
  # Evaluation mode is the identity.
  evaluated = nets.autoencoder.apply({"params": params}, x)
  no_drop = models.build(ModelConfig(image_size=128, ae_dropout=0.0)).autoencoder.apply(
      {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(no_drop))


def test_ae_and_stae_losses_share_one_dropped_autoencoder_output():
  cfg = Config(model=ModelConfig(image_size=64))
  nets = models.build(cfg.model)
  params = models.init_params(nets, jax.random.key(0), 64)
  c = cfg.model.teacher_channels
  stats = normalization.TeacherStats.identity(c)
  frozen = train_step.Frozen(teacher=params["teacher"], stats=stats)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=(1, 64, 64, 3)).astype(np.float32) for k in ("image", "image_ae")}
  key = jax.random.key(7)
  losses = train_step.compute_losses(nets, cfg, params, frozen, batch, key)
  a = nets.autoencoder.apply({"params": params["autoencoder"]}, batch["image_ae"], deterministic=False,
                             rngs={"dropout": key})
  t = nets.teacher.apply({"params": params["teacher"]}, batch["image_ae"])
  s = nets.student.apply({"params": params["student"]}, batch["image_ae"])[..., c:]
  np.testing.assert_allclose(float(losses["loss_ae"]), float(jnp.mean((t - a) ** 2)), rtol=1e-5)
  np.testing.assert_allclose(float(losses["loss_stae"]), float(jnp.mean((a - s) ** 2)), rtol=1e-5)
  evaluated = nets.autoencoder.apply({"params": params["autoencoder"]}, batch["image_ae"])
  assert float(jnp.abs(a - evaluated).max()) > 0  # the losses did see the dropped output


# --- The optimizer over many steps.


def test_optimizer_matches_torch_adam_and_steplr_over_60_steps():
  steps, cfg = 60, OptimConfig()
  rng = np.random.default_rng(0)
  p0 = {"w": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
  # Gradients over seven orders of magnitude: Adam's normalisation and eps both matter.
  grads = [{k: (rng.normal(size=v.shape) * 10 ** rng.uniform(-6, 1)).astype(np.float32) for k, v in p0.items()}
           for _ in range(steps)]

  ref = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
  opt = torch.optim.Adam(ref.values(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                         weight_decay=cfg.weight_decay)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg.decay_at_fraction * steps),
                                          gamma=cfg.decay_factor)
  tx = optim.make_optimizer(cfg, steps)
  params = {k: jnp.asarray(v) for k, v in p0.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    for k, p in ref.items():
      p.grad = torch.from_numpy(g[k])
    opt.step()
    sched.step()
    updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    for k, p in ref.items():
      np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=0, atol=2e-7)


def test_optimizer_decays_the_learning_rate_at_the_reference_step():
  cfg = OptimConfig()
  steps = 100
  boundary = int(cfg.decay_at_fraction * steps)
  tx = optim.make_optimizer(cfg, steps)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  sizes = []
  for _ in range(boundary + 2):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    sizes.append(abs(float(updates["w"])))
  # Constant gradient: Adam's step is lr; StepLR switches at update index `boundary` (0-based).
  np.testing.assert_allclose(sizes[boundary - 1], cfg.learning_rate, rtol=1e-5)
  np.testing.assert_allclose(sizes[boundary], cfg.learning_rate * cfg.decay_factor, rtol=1e-5)


# --- A training trajectory against PyTorch.


def _flax_params(module: torch.nn.Module, names: list[str]) -> dict:
  convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
  assert len(convs) == len(names)
  return {n: {"kernel": jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0)),
              "bias": jnp.asarray(c.bias.detach().numpy())} for n, c in zip(names, convs)}


def _torch_run(teacher, student, ae, mean, std, batches, cfg, steps):
  c = cfg.model.teacher_channels
  opt = torch.optim.Adam(itertools.chain(student.parameters(), ae.parameters()), lr=cfg.optim.learning_rate,
                         weight_decay=cfg.optim.weight_decay)
  sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg.optim.decay_at_fraction * steps),
                                          gamma=cfg.optim.decay_factor)
  losses = []
  for x, x_ae in batches:
    x, x_ae = torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(x_ae.transpose(0, 3, 1, 2))
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
    losses.append([v.item() for v in (loss_hard.detach(), loss_ae.detach(), loss_stae.detach())])
  return np.asarray(losses)


@pytest.mark.slow
def test_training_trajectory_matches_pytorch_without_dropout():
  size, steps = 64, 20
  # At 64x64 the student's output has 24,576 squared errors, and the paper's 0.999 quantile keeps only ~25 of
  # them: float rounding then flips an element in or out of the hard set within ~10 steps (on both sides
  # alike) and the two runs part, as two PyTorch runs on different thread counts would. At 0.9 the same
  # masked hard loss keeps ~2,500, as many as the paper's setting keeps at 256x256.
  cfg = Config(model=ModelConfig(image_size=size, ae_dropout=0.0), loss=LossConfig(hard_quantile=0.9))
  torch.manual_seed(0)
  teacher, student, ae = torch_reference.build_torch_models("small", size)
  ae.eval()  # no dropout on either side
  pdn_names = [f"conv{i}" for i in range(1, 5)]
  ae_names = [f"enc{i}" for i in range(1, 7)] + [f"dec{i}" for i in range(1, 9)]
  start = {"student": _flax_params(student, pdn_names), "autoencoder": _flax_params(ae, ae_names)}
  # NumPy copies: the train step donates (and so deletes) the state's device buffers.
  ours_start = {"student": weights.state_from_pdn_params(start["student"], "small"),
                "autoencoder": {n: np.asarray(start["autoencoder"][n]["kernel"]).transpose(3, 2, 0, 1)
                                for n in ae_names}}
  rng = np.random.default_rng(0)
  c = cfg.model.teacher_channels
  mean_np = rng.normal(size=c).astype(np.float32)
  std_np = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
  batches = [tuple(rng.uniform(-2, 2, (1, size, size, 3)).astype(np.float32) for _ in range(2))
             for _ in range(steps)]

  ours_losses = []
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, steps)
  state = train_step.init_state(start, tx)
  frozen = train_step.Frozen(teacher=_flax_params(teacher, pdn_names),
                             stats=normalization.TeacherStats(jnp.asarray(mean_np), jnp.asarray(std_np)))
  mesh = parallel.data_mesh(jax.devices()[:1])
  step = train_step.compile_train_step(nets, cfg, tx, mesh)
  for x, x_ae in batches:
    state, losses = step(state, frozen, parallel.shard_batch({"image": x, "image_ae": x_ae}, mesh),
                         jax.random.key(0))
    ours_losses.append([float(losses[k]) for k in ("loss_hard", "loss_ae", "loss_stae")])

  theirs = _torch_run(teacher, student, ae, torch.from_numpy(mean_np)[None, :, None, None],
                      torch.from_numpy(std_np)[None, :, None, None], batches, cfg, steps)
  np.testing.assert_allclose(np.asarray(ours_losses), theirs, rtol=2e-4)
  assert theirs[-1, 0] < theirs[0, 0]  # it did train

  # Parameters at the end: the accumulated updates agree (norm-wise; Adam turns gradients near zero into
  # +-lr steps, so single elements may differ by float rounding).
  ours_end = {"student": weights.state_from_pdn_params(state.params["student"], "small"),
              "autoencoder": {n: np.asarray(state.params["autoencoder"][n]["kernel"]).transpose(3, 2, 0, 1)
                              for n in ae_names}}
  theirs_end = {"student": {k: v.detach().numpy() for k, v in student.state_dict().items()},
                "autoencoder": {n: c.weight.detach().numpy() for n, c in
                                zip(ae_names, [m for m in ae.modules() if isinstance(m, torch.nn.Conv2d)])}}
  for net in ("student", "autoencoder"):
    for k, ref in theirs_end[net].items():
      moved = ref - ours_start[net][k]
      diff = ours_end[net][k] - ref
      assert np.linalg.norm(diff) <= 2e-2 * np.linalg.norm(moved) + 1e-7, (net, k)
