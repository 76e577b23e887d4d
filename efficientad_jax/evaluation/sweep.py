"""Reproducibility sweeps: every (collection, category, size, seed) run, aggregated into the paper's table.

  jobs = enumerate_jobs(["mvtec_ad"], ["S", "M"], range(5))     # deterministic order
  mine = task_jobs(jobs, task_index=0, num_tasks=4)             # job k belongs to task k % n
  statuses = run_jobs(mine, out, make_config)                   # skips finished runs, records failures
  statuses = run_jobs(mine, out, make_config, members=4)        # groups of up to 4 runs trained in one program
  rows, problems = aggregate(jobs, out)                         # mean ± std over seeds, paper beside
  tables.write_report(out, rows, problems, len(jobs))     # OUT/results.md, OUT/results.csv

A run lives in OUT/runs/<collection>/<category>/<size>/seed<seed>; it is finished when its
eval/metrics.json exists (written last by `evaluate.evaluate`). An interrupted run is simply run again:
`trainer.train` resumes from its checkpoints. A failing run leaves its traceback in sweep_error.txt.

With members > 1 (or "auto", `members.auto_members`), the unfinished runs of one collection and size
are trained in groups of up to that many by one program (`members_trainer.train_members`), each in its own
ordinary run folder, then evaluated one by one; members = 1 trains one run after another.

Reported metrics (docs/method.md §9-§10), in %: image AU-ROC; segmentation = AU-PRO up to FPR 0.3 (MVTec AD layout:
MVTec AD, VisA) or AU-sPRO up to 0.05 (LOCO layout: mean of structural and logical, each also given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import traceback
from collections.abc import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger("efficientad_jax")

COLLECTIONS = {
  "mvtec_ad": (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
  ),
  "visa": (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
  ),
  "mvtec_loco": ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"),
  # Synthetic objects are generated under any name (`--categories`); this is the default one.
  "synthetic": ("widget",),
}
TITLES = {"mvtec_ad": "MVTec AD", "visa": "VisA", "mvtec_loco": "LOCO", "synthetic": "synthetic"}
SIZES = {"s": "S", "small": "S", "m": "M", "medium": "M"}
PRO_LIMIT, SPRO_LIMIT = "0.3", "0.05"  # keys of metrics.json (`evaluate` writes float keys as strings)

# Paper (Batzner et al., WACV 2024, §4; docs/method.md §10), in %: (collection, size, metric) -> value; "all" is the
# mean over
# MVTec AD, VisA and LOCO (segmentation: AU-PRO, LOCO AU-sPRO), latency and throughput on an RTX A6000.
PAPER = {
  (collection, size, metric): value
  for collection, metric, values in (
    ("mvtec_ad", "image_auroc", (98.8, 99.1)),
    ("visa", "image_auroc", (97.5, 98.1)),
    ("mvtec_loco", "image_auroc", (90.0, 90.7)),
    ("mvtec_loco", "image_auroc_structural", (None, 94.7)),
    ("mvtec_loco", "image_auroc_logical", (None, 86.8)),
    ("all", "image_auroc", (95.4, 96.0)),
    ("all", "seg", (92.5, 93.3)),
    ("all", "latency_ms", (2.2, 4.5)),
    ("all", "throughput", (614.0, 269.0)),
  )
  for size, value in zip("SM", values)
  if value is not None
}
PAPER_COLLECTIONS = ("mvtec_ad", "visa", "mvtec_loco")
METRIC_NAMES = {"image_auroc": "image AU-ROC", "seg": "AU-PRO 0.3 / AU-sPRO 0.05"}


@dataclasses.dataclass(frozen=True, order=True)
class Job:
  """One training + evaluation run."""

  collection: str
  category: str
  size: str  # "S" | "M"
  seed: int

  def run_dir(self, out: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(out) / "runs" / self.collection / self.category / self.size / f"seed{self.seed}"

  def __str__(self) -> str:
    return f"{self.collection}/{self.category}/{self.size}/seed{self.seed}"


# --- Jobs.


def parse_seeds(text: str) -> tuple[int, ...]:
  """'0..4' or '0-4' (inclusive) | '0,2,7' | '0..2,7' -> sorted unique seeds."""
  seeds = set()
  for part in filter(None, (p.strip() for p in text.split(","))):
    bounds = re.fullmatch(r"(\d+)\s*(?:\.\.|-)\s*(\d+)|(\d+)", part)
    if not bounds:
      raise ValueError(f"seeds: {part!r} is neither a seed nor a range like 0-4 or 0..4 (in {text!r})")
    lo, hi, single = bounds.groups()
    lo, hi = (int(single), int(single)) if single else (int(lo), int(hi))
    if hi < lo:
      raise ValueError(f"seeds: the range {part!r} ends before it starts")
    seeds.update(range(lo, hi + 1))
  if not seeds:
    raise ValueError(f"no seeds in {text!r}")
  return tuple(sorted(seeds))


def parse_members(text: str) -> int | str:
  """'auto' | an integer >= 1: runs trained together in one program."""
  if text.strip().lower() == "auto":
    return "auto"
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"members: expected an integer >= 1 or 'auto', got {text!r}")
  return n


def parse_sizes(text: str) -> tuple[str, ...]:
  """'S,M' | 'small,medium' -> ('S', 'M')."""
  sizes = [p.strip().lower() for p in text.split(",") if p.strip()]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown or not sizes:
    raise ValueError(f"sizes must be S/small or M/medium, got {text!r}")
  return tuple(dict.fromkeys(SIZES[s] for s in sizes))


def enumerate_jobs(
  collections: Sequence[str], sizes: Sequence[str], seeds: Iterable[int], categories: Sequence[str] | None = None
) -> list[Job]:
  """Every (collection, category, size, seed) in a fixed order: collection, size, seed, category.

  Seeds come before categories so that a partly finished sweep already holds complete seed-0 tables.

  Args:
    categories: restricts every collection to those of its categories named here; a name that no chosen
      collection knows is an error (a typo must not shrink the sweep). For "synthetic" they are object names
      to generate.
  """
  collections, seeds = list(dict.fromkeys(collections)), tuple(seeds)  # no duplicates; seeds read per size
  unknown = [
    c
    for c in categories or ()
    if "synthetic" not in collections and not any(c in COLLECTIONS.get(k, ()) for k in collections)
  ]
  if unknown:
    raise ValueError(f"no chosen collection has the categories {unknown}")
  jobs = []
  for collection in collections:
    if collection not in COLLECTIONS:
      raise ValueError(f"unknown collection {collection!r}; known: {', '.join(COLLECTIONS)}")
    cats = COLLECTIONS[collection]
    if categories:
      cats = tuple(categories) if collection == "synthetic" else tuple(c for c in cats if c in categories)
    jobs += [Job(collection, c, s, int(seed)) for s in sizes for seed in seeds for c in cats]
  return jobs


def task_jobs(jobs: Sequence[Job], task_index: int, num_tasks: int) -> list[Job]:
  """The jobs of one machine: job k belongs to task k % num_tasks (round robin balances sizes)."""
  if num_tasks < 1 or not 0 <= task_index < num_tasks:
    raise ValueError(f"need 0 <= task_index < num_tasks, got {task_index} and {num_tasks}")
  return [job for k, job in enumerate(jobs) if k % num_tasks == task_index]


def job_status(job: Job, out: str | pathlib.Path) -> str:
  """'finished' (metrics.json) | 'failed' (sweep_error.txt) | 'incomplete' (started) | 'missing'."""
  run = job.run_dir(out)
  if (run / "eval" / "metrics.json").is_file():
    return "finished"
  if (run / "sweep_error.txt").is_file():
    return "failed"
  return "incomplete" if run.exists() else "missing"


# --- Running.


def run_job(job: Job, out: str | pathlib.Path, cfg) -> None:
  """Trains (resuming any checkpoint) and evaluates one run; raises whatever they raise."""
  from efficientad_jax.efficientad import trainer
  from efficientad_jax.evaluation import evaluate

  run = job.run_dir(out)
  trainer.train(cfg, run, progress=False)
  evaluate.evaluate(run, progress=False)


def run_jobs(
  jobs: Sequence[Job],
  out: str | pathlib.Path,
  make_config: Callable[[Job], object],
  run_fn: Callable = run_job,
  members: int | str = 1,
  group_fn: Callable | None = None,
) -> dict[Job, str]:
  """Runs each unfinished job in this process; a failure is recorded and the next job goes on.

  Args:
    make_config: job -> `config.Config` of that run (its category, seed, size, root, teacher, overrides).
    run_fn: fn(job, out, cfg), `run_job` (a parameter for tests).
    members: runs trained together (`group_jobs`; "auto": as many as fit the device, per size); 1 trains each
      job alone with run_fn, as does a group that is left with one job.
    group_fn: fn(jobs, out, cfgs) -> {job: None or its error's traceback}, `run_group` (for tests).
  Returns:
    {job: 'skipped' (already finished) | 'finished' | 'failed'}, in the order of `jobs`.
  """
  if members == 1:
    return _run_one_by_one(jobs, out, make_config, run_fn)
  statuses, pending = {}, []
  for k, job in enumerate(jobs, 1):
    if job_status(job, out) == "finished":
      log.info("[%d/%d] skip %s: finished", k, len(jobs), job)
      statuses[job] = "skipped"
    else:
      pending.append(job)
  sizes = _group_sizes(pending, make_config, members)
  order = {job: k for k, job in enumerate(jobs, 1)}
  for group in group_jobs(pending, sizes):
    if len(group) == 1:
      statuses.update(_run_one_by_one(group, out, make_config, run_fn, order, len(jobs)))
      continue
    for i, job in enumerate(group, 1):
      log.info("[%d/%d] run %s -> %s (member %d/%d)", order[job], len(jobs), job, job.run_dir(out), i, len(group))
      (job.run_dir(out) / "sweep_error.txt").unlink(missing_ok=True)
    try:
      errors = (group_fn or run_group)(group, out, [make_config(job) for job in group])
    except Exception:  # the group as a whole: every member failed
      errors = dict.fromkeys(group, traceback.format_exc())
    for job in group:
      statuses[job] = _record(job, out, errors.get(job), order[job], len(jobs))
  return {job: statuses[job] for job in jobs}


def _run_one_by_one(jobs, out, make_config, run_fn, order=None, total=None) -> dict[Job, str]:
  """Each job alone: trained with run_fn, skipped when finished (members = 1)."""
  statuses = {}
  for k, job in enumerate(jobs, 1):
    k, n = (order[job], total) if order else (k, len(jobs))
    run = job.run_dir(out)
    if job_status(job, out) == "finished":
      log.info("[%d/%d] skip %s: finished", k, n, job)
      statuses[job] = "skipped"
      continue
    log.info("[%d/%d] run %s -> %s", k, n, job, run)
    (run / "sweep_error.txt").unlink(missing_ok=True)  # a retry starts clean; it fails again or finishes
    try:
      run_fn(job, out, make_config(job))
      error = None
    except Exception:
      error = traceback.format_exc()
    statuses[job] = _record(job, out, error, k, n)
  return statuses


def _record(job: Job, out: str | pathlib.Path, error: str | None, k: int, n: int) -> str:
  """'finished', or 'failed' with the traceback in RUN/sweep_error.txt."""
  if error is None:
    return "finished"
  run = job.run_dir(out)
  run.mkdir(parents=True, exist_ok=True)
  (run / "sweep_error.txt").write_text(error)
  log.error("[%d/%d] %s failed (traceback in %s)", k, n, job, run / "sweep_error.txt")
  return "failed"


def _group_sizes(jobs: Sequence[Job], make_config: Callable, members: int | str) -> dict[str, int]:
  """{model size: members per group}; "auto" asks `members.auto_members` once per size."""
  if members != "auto":
    return {job.size: int(members) for job in jobs}
  from efficientad_jax.efficientad.members import auto_members

  first = {job.size: job for job in reversed(jobs)}  # the first job of each size
  return {size: auto_members(make_config(job)) for size, job in first.items()}


def group_jobs(jobs: Sequence[Job], sizes: dict[str, int]) -> list[list[Job]]:
  """Consecutive jobs of one collection and size, in groups of up to sizes[size] (in the order of `jobs`)."""
  groups: list[list[Job]] = []
  for job in jobs:
    last = groups[-1] if groups else None
    same = last and (last[0].collection, last[0].size) == (job.collection, job.size)
    if same and len(last) < sizes[job.size]:
      last.append(job)
    else:
      groups.append([job])
  return groups


def run_group(jobs: Sequence[Job], out: str | pathlib.Path, cfgs: Sequence) -> dict[Job, str | None]:
  """Trains the jobs as one group (`members_trainer.train_members`, each resuming its own checkpoints), then
  evaluates each member that has its model; {job: None, or its error's traceback}."""
  from efficientad_jax.efficientad import members_trainer
  from efficientad_jax.evaluation import evaluate

  results = members_trainer.train_members(cfgs, [job.run_dir(out) for job in jobs], progress=False)
  errors = {}
  for job, result in zip(jobs, results):
    if result.error is not None:
      errors[job] = "".join(traceback.format_exception(result.error))
      continue
    try:
      evaluate.evaluate(job.run_dir(out), progress=False)
      errors[job] = None
    except Exception:
      errors[job] = traceback.format_exc()
  return errors


# --- Aggregation.


def run_metrics(m: dict) -> dict[str, float]:
  """One metrics.json -> {metric: value in %} (module doc)."""
  res = m["metrics"]
  if m["layout"] == "mvtec_loco":
    return {
      "image_auroc": 100 * res["mean"]["image_auroc"],
      "seg": 100 * res["mean"]["au_spro"][SPRO_LIMIT],
      "image_auroc_structural": 100 * res["structural"]["image_auroc"],
      "image_auroc_logical": 100 * res["logical"]["image_auroc"],
      "spro_structural": 100 * res["structural"]["au_spro"][SPRO_LIMIT],
      "spro_logical": 100 * res["logical"]["au_spro"][SPRO_LIMIT],
    }
  return {"image_auroc": 100 * res["image_auroc"], "seg": 100 * res["au_pro"][PRO_LIMIT]}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std with ddof=1); the std of a single value is NaN: one seed says nothing about spread."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def collect(jobs: Sequence[Job], out: str | pathlib.Path) -> tuple[dict[Job, dict], list[tuple[Job, str, str]]]:
  """({job: run_metrics} of the finished runs, [(job, status, reason)] of all the others)."""
  results, problems = {}, []
  for job in jobs:
    status, run = job_status(job, out), job.run_dir(out)
    if status == "finished":
      try:
        results[job] = run_metrics(json.loads((run / "eval" / "metrics.json").read_text()))
      except (ValueError, KeyError, TypeError) as e:  # e.g. a file cut short: listed, never a crash
        problems.append((job, "unreadable", f"eval/metrics.json: {type(e).__name__}: {e}"))
    else:  # a failure's reason: the exception line, the last of the traceback
      reason = ([""] + (run / "sweep_error.txt").read_text().strip().splitlines())[-1] if status == "failed" else ""
      problems.append((job, status, reason))
  return results, problems


def _row(level, collection, category, size, metric, values):
  mean, std = mean_std(values)
  return {
    "level": level,
    "collection": collection,
    "category": category,
    "size": size,
    "metric": metric,
    "n": len(values),
    "mean": mean,
    "std": std,
    "paper": PAPER.get((collection, size, metric)),
  }


def aggregate(jobs: Sequence[Job], out: str | pathlib.Path) -> tuple[list[dict], list[tuple[Job, str, str]]]:
  """Mean ± std over seeds at three levels; returns (rows, problems of `collect`).

  category:   the seeds of one (collection, category, size).
  collection: per seed the mean over the collection's categories that seed has, then mean ± std over seeds.
  all:        per seed the mean over the collections (image AU-ROC, segmentation), then over seeds; the
              paper's value is given only when the sweep covers exactly MVTec AD, VisA and LOCO.
  """
  results, problems = collect(jobs, out)
  rows, per_seed, overall = [], {}, {}  # per_seed[(collection, size, metric)][seed] = [category values]
  for key in dict.fromkeys((j.collection, j.category, j.size) for j in jobs):
    runs = {j.seed: m for j, m in sorted(results.items()) if (j.collection, j.category, j.size) == key}
    for metric in dict.fromkeys(name for m in runs.values() for name in m):  # one layout per category
      rows.append(_row("category", *key, metric, [m[metric] for m in runs.values()]))
      for seed, m in runs.items():
        per_seed.setdefault((key[0], key[2], metric), {}).setdefault(seed, []).append(m[metric])
  for (collection, size, metric), seeds in per_seed.items():
    means = {seed: float(np.mean(v)) for seed, v in sorted(seeds.items())}
    rows.append(_row("collection", collection, "mean", size, metric, list(means.values())))
    for seed, v in means.items() if metric in ("image_auroc", "seg") else ():
      overall.setdefault((size, metric), {}).setdefault(seed, []).append(v)
  chosen = {j.collection for j in jobs}
  for (size, metric), seeds in overall.items():
    complete = [float(np.mean(v)) for _, v in sorted(seeds.items()) if len(v) == len(chosen)]
    if complete:
      row = _row("all", "all", "mean", size, metric, complete)
      rows.append(row if chosen == set(PAPER_COLLECTIONS) else {**row, "paper": None})
  return rows, problems
