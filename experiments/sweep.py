r"""Reproducibility sweep: train + evaluate every (collection, category, size, seed), then the paper's table.

  python -m experiments.sweep --collections mvtec_ad,visa,mvtec_loco --sizes S,M --seeds 0-4 \
      --root-mvtec-ad /data/mvtec_ad --root-visa /data/visa --root-mvtec-loco /data/mvtec_loco \
      --teacher-small teachers/small --teacher-medium teachers/medium \
      --set data.penalty=/data/imagenette/train --out sweeps/paper
  # on 4 machines: add --task-index i --num-tasks 4 (job k runs on task k % 4), then once:
  python -m experiments.sweep ...same selection... --out sweeps/paper --aggregate-only --benchmark bench.json

--members N (or auto: as many as fit the accelerator's memory; 1 on a CPU) trains up to N runs of one collection
and size in one program, each in its own run folder (efficientad_jax/efficientad/members_trainer.py); the
default 1 trains one run after another. Finished runs (RUN/eval/metrics.json) are skipped, interrupted ones
resume from their checkpoints, a failing run is recorded (RUN/sweep_error.txt) and the others go on; the exit
status is 1 when any run of this task failed (or, with --aggregate-only, when any run of the sweep is recorded
as failed). Writes OUT/results.md and OUT/results.csv; runs live in
OUT/runs/<collection>/<category>/<S|M>/seed<seed>. The paper's settings (70,000 steps, 256 px) need about 5 (S)
and 16 (M) minutes of GPU compute per run (an estimate, not measured: README "Sweeps and notebooks"), plus data
loading and evaluation: 32 categories x 2 sizes x 5 seeds = 320 runs.
"""

from __future__ import annotations

import argparse
import sys

from efficientad_jax import config as config_lib
from efficientad_jax.evaluation import sweep, tables
from experiments import cli
from experiments.train import load_config


def members_arg(text: str) -> int | str:
  """argparse type of --members: a bad value is a usage error (exit status 2)."""
  try:
    return sweep.parse_members(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--collections", default="mvtec_ad,visa,mvtec_loco", help=f"comma-separated, of: {', '.join(sweep.COLLECTIONS)}"
  )
  p.add_argument("--categories", help="comma-separated subset (synthetic: object names to generate)")
  p.add_argument("--sizes", default="S,M", help="S,M (or small,medium)")
  p.add_argument("--seeds", default="0..4", help="'0-4' or '0..4' (inclusive), '0,1,2' or a mix")
  p.add_argument(
    "--members",
    default=1,
    type=members_arg,
    help="runs of one collection and size trained together in one program: N, or auto (as many as fit the "
    "device's memory; 1 on a CPU, where grouping is slower)",
  )
  for name in sweep.COLLECTIONS:
    flags = dict.fromkeys([f"--root-{name.replace('_', '-')}", f"--root-{name}"])  # both spellings work
    p.add_argument(*flags, dest=f"root_{name}", default="", help=f"{name} dataset folder (data.root)")
  p.add_argument("--teacher-small", default="", help="teacher checkpoint of the S runs (train.teacher_checkpoint)")
  p.add_argument("--teacher-medium", default="", help="teacher checkpoint of the M runs")
  p.add_argument("--variant", default="", help="config variant appended to the size, e.g. 'tiny' (synthetic)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="config override for every run, e.g. --set data.penalty=/data/imagenette/train",
  )
  p.add_argument("--out", required=True, help="sweep folder (runs/, results.md, results.csv)")
  p.add_argument("--task-index", type=int, default=0)
  p.add_argument("--num-tasks", type=int, default=1)
  p.add_argument("--aggregate-only", action="store_true", help="only write the tables from finished runs")
  p.add_argument(
    "--compilation-cache",
    default=None,
    help="XLA persistent compilation cache folder shared by the runs (default OUT/jax_cache; '' = off)",
  )
  p.add_argument("--benchmark", help="benchmark JSON with latency/throughput per size (tables.load_benchmark)")
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def config_maker(args: argparse.Namespace):
  """job -> Config: the collection's config at the job's size, category, seed, root, teacher, then --set."""
  teachers = {"S": args.teacher_small, "M": args.teacher_medium}

  def make(job: sweep.Job):
    arg = ",".join(filter(None, (job.size, args.variant)))
    sets = [f"data.category={job.category}", f"train.seed={job.seed}"]
    root = getattr(args, f"root_{job.collection}")
    sets += [f"data.root={root}"] if root else []
    sets += [f"train.teacher_checkpoint={teachers[job.size]}"] if teachers[job.size] else []
    return config_lib.override(load_config(job.collection, arg, None), sets + args.set)

  return make


def enable_compilation_cache(path: str) -> None:
  """Every run of one size compiles the same programs (only data and seeds differ), so XLA's persistent cache
  compiles them once per sweep, and once for all tasks that share the folder (the key holds the device kind)."""
  import jax

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.setup_logging()
  try:
    categories = args.categories.split(",") if args.categories else None
    jobs = sweep.enumerate_jobs(
      args.collections.split(","), sweep.parse_sizes(args.sizes), sweep.parse_seeds(args.seeds), categories
    )
    mine = sweep.task_jobs(jobs, args.task_index, args.num_tasks)
    make_config = config_maker(args)
    for job in mine:  # a bad --set or root fails here, at once, not once per run hours later
      make_config(job)
    bench = tables.load_benchmark(args.benchmark) if args.benchmark else None
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  failed = []
  if not args.aggregate_only:
    print(f"task {args.task_index}/{args.num_tasks}: {len(mine)} of {len(jobs)} runs", flush=True)
    cache = f"{args.out}/jax_cache" if args.compilation_cache is None else args.compilation_cache
    if cache and any(sweep.job_status(job, args.out) != "finished" for job in mine):
      enable_compilation_cache(cache)
    statuses = sweep.run_jobs(mine, args.out, make_config, members=args.members)
    failed = [job for job, status in statuses.items() if status == "failed"]
  rows, problems = sweep.aggregate(jobs, args.out)
  md, csv = tables.write_report(args.out, rows, problems, len(jobs), bench)
  print(f"{len(jobs) - len(problems)} of {len(jobs)} runs finished; tables: {md}, {csv}")
  for job, status, reason in problems:
    print(f"  {status}: {job}" + (f": {reason}" if reason else ""))
  if args.aggregate_only:
    failed = [job for job, status, _ in problems if status == "failed"]
  return 1 if failed else 0


def command() -> None:
  """The `efficientad-sweep` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
