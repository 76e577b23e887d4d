"""PyTorch reference timings on the same machine: JAX/PyTorch ratios for training and inference.

Builds PDN-S/M and the autoencoder from torch.nn primitives (written from docs/method.md §2-§3, not copied from a
peer), times inference maps (teacher, student, autoencoder, both maps, normalisation) and one
forward+backward+Adam training step (docs/method.md §5-§6) at batch 1, then the same two things in JAX through the
project's own `make_predict_fn` and `compile_train_step`, in one process so both see the same machine load.

  python -m experiments.torch_reference --sizes small --image-size 256 --runs 10 --out torch_ref.json

Needs torch (CPU is enough); exits with a message when it is missing. Medians over `--runs` after `--warmup`,
the contenders run in turn within each round.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np

from experiments import benchmark, benchmark_train

PAUSE_S = 0.5  # idle time before each timed call (see _interleaved_medians)


def _torch():
  try:
    import torch
  except ImportError:
    raise SystemExit("torch_reference needs PyTorch (pip install torch); it is optional for the project") from None
  return torch


def build_torch_models(size: str, image_size: int, channels: int = 384):
  """(teacher, student, autoencoder) torch.nn.Modules with the docs/method.md §2-§3 architectures (unpadded PDN)."""
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional

  def pdn(out: int) -> nn.Module:
    if size == "small":
      layers = [
        nn.Conv2d(3, 128, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(128, 256, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 256, 3),
        nn.ReLU(),
        nn.Conv2d(256, out, 4),
      ]
    else:
      layers = [
        nn.Conv2d(3, 256, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 512, 4),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(512, 512, 1),
        nn.ReLU(),
        nn.Conv2d(512, 512, 3),
        nn.ReLU(),
        nn.Conv2d(512, out, 4),
        nn.ReLU(),
        nn.Conv2d(out, out, 1),
      ]
    return nn.Sequential(*layers)

  n = image_size
  sizes = [max(1, s) for s in (n // 64 - 1, n // 32, n // 16 - 1, n // 8, n // 4 - 1, n // 2 - 1)]
  out_size = benchmark.pdn_out(image_size, size)

  class Autoencoder(nn.Module):
    """5 x (conv k4 s2 p1, ReLU), conv k(n/32); 6 x (resize, conv k4 p2, ReLU, dropout), 2 k3 convs."""

    def __init__(self):
      super().__init__()
      chans = [3, 32, 32, 64, 64, 64]
      self.enc = nn.ModuleList([nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1) for i in range(5)])
      self.bottleneck = nn.Conv2d(64, 64, n // 32)
      self.dec = nn.ModuleList([nn.Conv2d(64, 64, 4, 1, 2) for _ in range(6)])
      self.drop = nn.Dropout(0.2)
      self.dec7 = nn.Conv2d(64, 64, 3, 1, 1)
      self.dec8 = nn.Conv2d(64, channels, 3, 1, 1)

    def forward(self, x):
      for c in self.enc:
        x = F.relu(c(x))
      x = self.bottleneck(x)
      for s, c in zip(sizes, self.dec):
        x = F.interpolate(x, size=s, mode="bilinear", align_corners=False)
        x = self.drop(F.relu(c(x)))
      x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
      return self.dec8(F.relu(self.dec7(x)))

  return pdn(channels), pdn(2 * channels), Autoencoder()


def torch_predict_fn(size: str, image_size: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Host NCHW image -> (host anomaly map at image size, host score), like the JAX predict path."""
  torch = _torch()
  F = torch.nn.functional
  teacher, student, ae = (m.eval() for m in build_torch_models(size, image_size))
  c = 384
  mean, std = torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1)
  qa, qb = 0.0, 1.0

  @torch.no_grad()
  def predict(image: np.ndarray):
    x = torch.from_numpy(image)
    t = (teacher(x) - mean) / std
    s = student(x)
    a = ae(x)
    map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)
    map_ae = torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)
    combined = 0.5 * 0.1 * (map_st - qa) / (qb - qa) + 0.5 * 0.1 * (map_ae - qa) / (qb - qa)
    combined = F.pad(combined, (4, 4, 4, 4))
    amap = F.interpolate(combined, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return amap[:, 0].numpy(), torch.amax(amap, dim=(1, 2, 3)).numpy()

  return predict


def torch_train_step_fn(size: str, image_size: int) -> Callable[[dict], float]:
  """One docs/method.md §5-§6 step (hard loss, penalty, AE and student-AE losses; Adam with coupled L2) on host
  batches."""
  torch = _torch()
  teacher, student, ae = build_torch_models(size, image_size)
  teacher.eval()
  student.train()
  ae.train()
  opt = torch.optim.Adam(list(student.parameters()) + list(ae.parameters()), lr=1e-4, weight_decay=1e-5)
  c = 384

  def step(batch: dict) -> float:
    x, x_ae, p = (torch.from_numpy(batch[k]) for k in ("image", "image_ae", "penalty"))
    with torch.no_grad():
      t = teacher(torch.cat([x, x_ae]))
    b = x.shape[0]
    s = student(torch.cat([x, x_ae, p]))
    a = ae(x_ae)
    d = (t[:b] - s[:b, :c]) ** 2
    d_hard = torch.quantile(d.flatten(), 0.999)
    loss_hard = torch.mean(d[d >= d_hard])
    loss = (
      loss_hard
      + torch.mean(s[2 * b :, :c] ** 2)
      + torch.mean((t[b:] - a) ** 2)
      + torch.mean((a - s[b : 2 * b, c:]) ** 2)
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step


def _interleaved_medians(
  fns: dict[str, Callable[[], object]], warmup: int, runs: int, pause_s: float = PAUSE_S
) -> dict[str, float]:
  """Median seconds of each fn, run in turn (a, b, c, a, b, c, ...) so that a shared machine's changing load
  hits all of them alike; `warmup` untimed rounds first. Each call starts `pause_s` after the previous one
  ended: PyTorch's OpenMP workers keep spinning for a while after an op and would otherwise steal the cores
  from the next contender (measured: JAX inference 218 ms alone, 252 ms right after PyTorch calls)."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      time.sleep(pause_s)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def compare(size: str, image_size: int, warmup: int, runs: int) -> dict:
  """Median seconds per inference image and per training step, JAX and PyTorch, and their ratios."""
  torch = _torch()
  rng = np.random.default_rng(0)
  nchw = rng.normal(size=(1, 3, image_size, image_size)).astype(np.float32)
  nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
  batch_t = {
    k: rng.normal(size=(1, 3, image_size, image_size)).astype(np.float32) for k in ("image", "image_ae", "penalty")
  }
  batch_j = {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) for k, v in batch_t.items()}

  torch_predict = torch_predict_fn(size, image_size)
  jax_predict = benchmark.host_predict_fn(size, "float32", image_size)
  torch_step = torch_train_step_fn(size, image_size)
  jax_step = benchmark_train.random_train_step_fn(size, image_size)
  jax_step_xla = benchmark_train.random_train_step_fn(size, image_size, impl="xla")  # XLA's own conv backward

  out = {
    "size": size,
    "image_size": image_size,
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "runs": runs,
    "warmup": warmup,
  }
  infer = _interleaved_medians({"torch": lambda: torch_predict(nchw), "jax": lambda: jax_predict(nhwc)}, warmup, runs)
  train = _interleaved_medians(
    {"torch": lambda: torch_step(batch_t), "jax": lambda: jax_step(batch_j), "jax_xla": lambda: jax_step_xla(batch_j)},
    min(warmup, 2),
    runs,
  )
  out["torch_infer_s"], out["jax_infer_s"] = infer["torch"], infer["jax"]
  out["torch_train_step_s"], out["jax_train_step_s"] = train["torch"], train["jax"]
  out["jax_train_step_xla_s"] = train["jax_xla"]
  out["infer_ratio_jax_over_torch"] = out["jax_infer_s"] / out["torch_infer_s"]
  out["train_ratio_jax_over_torch"] = out["jax_train_step_s"] / out["torch_train_step_s"]
  out["train_ratio_jax_xla_over_torch"] = out["jax_train_step_xla_s"] / out["torch_train_step_s"]
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small")
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  env = benchmark.environment()
  env["machine"] = platform.processor() or platform.machine()
  results = [compare(s, args.image_size, args.warmup, args.runs) for s in args.sizes.split(",")]
  print(f"device: {env['device']} | jax {env['jax_version']} | {env['date']}")
  print(
    "| model | JAX infer ms | torch infer ms | ratio | JAX train s/step (auto / xla) | "
    "torch train s/step | "
    "ratio (auto / xla) |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['size']} | {1e3 * r['jax_infer_s']:.1f} | {1e3 * r['torch_infer_s']:.1f} | "
      f"{r['infer_ratio_jax_over_torch']:.2f} | {r['jax_train_step_s']:.3f} / "
      f"{r['jax_train_step_xla_s']:.3f} | "
      f"{r['torch_train_step_s']:.3f} | {r['train_ratio_jax_over_torch']:.2f} / "
      f"{r['train_ratio_jax_xla_over_torch']:.2f} |"
    )
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
