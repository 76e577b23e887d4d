"""`experiments.benchmark --mode members`: training steps per second per member when N models train in one
program (efficientad_jax/efficientad/members.py), against one model alone (N = 1).

For each N: one compiled `members_step` over N states (random networks, one shared random teacher), N random
uint8 batches of batch size 1 and N keys; timed rounds interleave the Ns, so a shared machine's load hits all of
them alike; medians. Memory per member: the compiled step's argument, output and temporary bytes (XLA's
`memory_analysis`), divided by N.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from efficientad_jax import models
from efficientad_jax.config import Config, ModelConfig, TrainConfig
from efficientad_jax.efficientad import members, train_step
from efficientad_jax.efficientad.normalization import TeacherStats
from efficientad_jax.training import optim


def group(cfg: Config, n: int, seed: int):
  """(compiled step, its arguments) for n members of `cfg`."""
  nets = models.build(cfg.model)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  size, c = cfg.model.image_size, cfg.model.teacher_channels
  teacher = models.init_params(nets, jax.random.key(seed), size)["teacher"]
  states = members.stack(
    [train_step.init_state(models.init_params(nets, jax.random.key(seed + 1 + i), size), tx) for i in range(n)]
  )
  stats = members.stack([TeacherStats.identity(c)] * n)
  rng = np.random.default_rng(seed)
  batches = {k: rng.integers(0, 256, (n, 1, *size, 3), dtype=np.uint8) for k in ("image", "image_ae", "penalty")}
  keys = jax.numpy.stack([jax.random.key(seed + 100 + i) for i in range(n)])
  step = members.compile_members_step(nets, cfg, tx)
  compiled = step.lower(states, teacher, stats, batches, keys).compile()
  return step, [states, teacher, stats, batches, keys], compiled.memory_analysis()


def bench_members(size: str, args: argparse.Namespace) -> list[dict]:
  cfg = Config(
    model=ModelConfig(size=size, image_size=args.image_size),
    train=TrainConfig(steps=args.train_steps + args.train_warmup),
  )
  groups, compile_s = {}, {}
  for n in args.members:
    start = time.perf_counter()
    groups[n] = group(cfg, n, args.seed)
    step, call, _ = groups[n]
    for _ in range(args.train_warmup):  # the first call also places the arguments
      call[0], losses = step(*call)
    jax.block_until_ready(losses)
    compile_s[n] = time.perf_counter() - start
  seconds = {n: [] for n in args.members}
  for _ in range(args.train_steps):  # interleaved: one step of every N per round
    for n in args.members:
      step, call, _ = groups[n]
      start = time.perf_counter()
      call[0], losses = step(*call)
      jax.block_until_ready(losses)
      seconds[n].append(time.perf_counter() - start)
  solo = None
  results = []
  for n in args.members:
    median = float(np.median(seconds[n]))
    per_member = n / median
    solo = per_member if n == 1 else solo
    mem = members.memory_bytes(groups[n][2])
    results.append(
      {
        "size": size,
        "image_size": list(cfg.model.image_size),
        "members": n,
        "median_step_ms": 1e3 * median,
        "steps_per_s_per_member": per_member,
        "ratio_to_solo": None if solo is None else per_member / solo,
        "memory_per_member_mib": None if mem is None else mem / n / 2**20,
        "compile_and_warmup_s": compile_s[n],
        "steps_timed": len(seconds[n]),
      }
    )
  return results


def print_members(results: list[dict], env: dict) -> None:
  print(f"\n{env['device']} ({env['platform']}), jax {env['jax_version']}, {env['date']}")
  print("| size | image | members | ms / step | steps/s per member | x solo | MiB per member |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    ratio = "" if r["ratio_to_solo"] is None else f"{r['ratio_to_solo']:.2f}"
    mem = "" if r["memory_per_member_mib"] is None else f"{r['memory_per_member_mib']:.0f}"
    print(
      f"| {r['size']} | {'x'.join(map(str, r['image_size']))} | {r['members']} | {r['median_step_ms']:.1f} | "
      f"{r['steps_per_s_per_member']:.2f} | {ratio} | {mem} |"
    )
