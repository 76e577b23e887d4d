"""The sweep: job enumeration and splitting, aggregation against NumPy, failures, the paper's numbers, and a
real tiny sweep (synthetic, 2 objects x 2 seeds) split over 2 tasks, then re-run to check it skips."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from efficientad_jax.evaluation import sweep, tables
from efficientad_jax.serving import saved_model
from experiments import sweep as sweep_cli
from tests.conftest import REPO, jax_cache_env

TINY_ARGS = [
  "--collections",
  "synthetic",
  "--categories",
  "a,b",
  "--sizes",
  "S",
  "--seeds",
  "0..1",
  "--variant",
  "tiny",
]


def read_csv(path):
  with open(path, newline="") as f:
    return {(r["level"], r["collection"], r["category"], r["size"], r["metric"]): r for r in csv.DictReader(f)}


def fake_metrics(layout, auroc, seg):
  """A metrics.json as `evaluate` writes it (fractions; float limits as string keys)."""
  if layout == "mvtec_loco":
    split = lambda a, s: {"image_auroc": a, "au_spro": {"0.01": 0.0, "0.05": s, "1.0": 1.0}}
    return {
      "layout": layout,
      "metrics": {
        "structural": split(auroc + 0.02, seg + 0.01),
        "logical": split(auroc - 0.02, seg - 0.01),
        "mean": split(auroc, seg),
      },
    }
  return {"layout": layout, "metrics": {"image_auroc": auroc, "au_pro": {"0.05": 0.0, "0.3": seg, "1.0": 1.0}}}


def write_run(out, job, m):
  path = job.run_dir(out) / "eval" / "metrics.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(m))


# --- Jobs.


def test_parse_seeds_and_sizes():
  assert sweep.parse_seeds("0..4") == sweep.parse_seeds("0-4") == sweep.parse_seeds(" 0 - 4 ") == (0, 1, 2, 3, 4)
  assert sweep.parse_seeds("3,0..1,3") == sweep.parse_seeds("3,0-1") == (0, 1, 3)
  for bad in ("0-x", "a", "1..", "-1", "0-4-5"):
    with pytest.raises(ValueError, match="neither a seed nor a range"):
      sweep.parse_seeds(bad)
  with pytest.raises(ValueError, match="ends before it starts"):
    sweep.parse_seeds("4-0")
  assert sweep.parse_sizes("small,M,S") == ("S", "M")
  with pytest.raises(ValueError, match="sizes"):
    sweep.parse_sizes("L")
  with pytest.raises(ValueError, match="no seeds"):
    sweep.parse_seeds(",")


def test_members_flag_and_groups(capsys):
  assert sweep.parse_members("auto") == "auto" and sweep.parse_members("3") == 3
  for bad in ("0", "-2", "x", ""):
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
      sweep.parse_members(bad)
    with pytest.raises(SystemExit) as stop:  # argparse: one line (after the usage), exit status 2
      sweep_cli.parse_args(["--out", "o", "--members", bad])
    assert stop.value.code == 2
    assert f"argument --members: expected an integer >= 1 or 'auto', got '{bad}'" in capsys.readouterr().err
  assert sweep_cli.parse_args(["--out", "o", "--collection", "mvtec_ad", "--seeds", "0-4"]).collections == "mvtec_ad"
  # Groups: consecutive jobs of one collection and size, up to N each.
  jobs = sweep.enumerate_jobs(["mvtec_loco", "visa"], ["S", "M"], [0, 1], ["pushpins", "screw_bag", "pcb1"])
  groups = sweep.group_jobs(jobs, {"S": 3, "M": 2})
  assert [g for group in groups for g in group] == jobs
  assert [len(g) for g in groups] == [3, 1, 2, 2, 2, 2]
  assert all(len({(j.collection, j.size) for j in g}) == 1 for g in groups)


def test_the_paper_sweep_has_every_job_once_in_a_fixed_order():
  assert [len(sweep.COLLECTIONS[c]) for c in sweep.PAPER_COLLECTIONS] == [15, 12, 5]
  jobs = sweep.enumerate_jobs(sweep.PAPER_COLLECTIONS, ("S", "M"), range(5))
  assert len(jobs) == len(set(jobs)) == 32 * 2 * 5
  assert jobs == sweep.enumerate_jobs(sweep.PAPER_COLLECTIONS, ("S", "M"), range(5))
  # collection, size, seed, category: seed 0 of every category comes first
  assert jobs[:2] == [sweep.Job("mvtec_ad", "bottle", "S", 0), sweep.Job("mvtec_ad", "cable", "S", 0)]
  assert jobs[15] == sweep.Job("mvtec_ad", "bottle", "S", 1)
  assert jobs[-1] == sweep.Job("mvtec_loco", "splicing_connectors", "M", 4)
  assert str(jobs[0].run_dir("/s")) == "/s/runs/mvtec_ad/bottle/S/seed0"


def test_categories_restrict_and_unknown_ones_are_errors():
  jobs = sweep.enumerate_jobs(["mvtec_ad", "visa"], ["S"], [0], ["bottle", "pcb1"])
  assert jobs == [sweep.Job("mvtec_ad", "bottle", "S", 0), sweep.Job("visa", "pcb1", "S", 0)]
  assert [j.category for j in sweep.enumerate_jobs(["synthetic"], ["S"], [0], ["x", "y"])] == ["x", "y"]
  assert [j.category for j in sweep.enumerate_jobs(["synthetic"], ["S"], [0])] == ["widget"]
  with pytest.raises(ValueError, match="bottel"):
    sweep.enumerate_jobs(["mvtec_ad"], ["S"], [0], ["bottel"])
  with pytest.raises(ValueError, match="unknown collection"):
    sweep.enumerate_jobs(["mvtec"], ["S"], [0])


def test_tasks_split_the_jobs_round_robin():
  jobs = sweep.enumerate_jobs(["mvtec_loco"], ["S", "M"], range(3))
  tasks = [sweep.task_jobs(jobs, i, 4) for i in range(4)]
  assert sorted(j for t in tasks for j in t) == sorted(jobs)  # every job exactly once
  for k, job in enumerate(jobs):
    assert job in tasks[k % 4]
  assert max(map(len, tasks)) - min(map(len, tasks)) <= 1
  for bad in ((4, 4), (-1, 2), (0, 0)):
    with pytest.raises(ValueError, match="task_index"):
      sweep.task_jobs(jobs, *bad)


# --- Aggregation, failures, paper numbers (written metrics, no training).


def test_aggregation_equals_numpy_with_a_missing_run(tmp_path):
  rng = np.random.default_rng(0)
  jobs = sweep.enumerate_jobs(["mvtec_ad", "mvtec_loco"], ["S"], range(3), ["bottle", "cable", "pushpins"])
  values = {}
  for job in jobs[:-1]:  # the last run (mvtec_loco/pushpins/S/seed2) is missing
    auroc, seg = rng.uniform(0.8, 1.0, 2)
    values[job] = (100 * auroc, 100 * seg)
    write_run(tmp_path, job, fake_metrics("mvtec_loco" if job.collection == "mvtec_loco" else "mvtec_ad", auroc, seg))
  rows, problems = sweep.aggregate(jobs, tmp_path)
  assert [(str(j), s) for j, s, _ in problems] == [("mvtec_loco/pushpins/S/seed2", "missing")]
  cut = jobs[-1].run_dir(tmp_path) / "eval" / "metrics.json"
  cut.parent.mkdir(parents=True)
  cut.write_text('{"layout": "mvtec_lo')  # a file cut short is listed, not a crash
  assert [s for _, s, _ in sweep.aggregate(jobs, tmp_path)[1]] == ["unreadable"]
  cut.unlink()
  got = {(r["level"], r["collection"], r["category"], r["metric"]): r for r in rows}
  for cat, seeds in (("bottle", 3), ("cable", 3), ("pushpins", 2)):
    coll = "mvtec_loco" if cat == "pushpins" else "mvtec_ad"
    auroc = [values[sweep.Job(coll, cat, "S", s)][0] for s in range(seeds)]
    r = got[("category", coll, cat, "image_auroc")]
    assert (r["n"], r["mean"], r["std"]) == (seeds, pytest.approx(np.mean(auroc)), pytest.approx(np.std(auroc, ddof=1)))
  # collection: per seed the mean over the categories, then over seeds
  per_seed = [np.mean([values[sweep.Job("mvtec_ad", c, "S", s)][1] for c in ("bottle", "cable")]) for s in range(3)]
  r = got[("collection", "mvtec_ad", "mean", "seg")]
  assert (r["mean"], r["std"]) == (pytest.approx(np.mean(per_seed)), pytest.approx(np.std(per_seed, ddof=1)))
  # all: only seeds present in both collections
  both = [
    np.mean([values[sweep.Job("mvtec_ad", c, "S", s)][0] for c in ("bottle", "cable")]) / 2
    + values[sweep.Job("mvtec_loco", "pushpins", "S", s)][0] / 2
    for s in range(2)
  ]
  r = got[("all", "all", "mean", "image_auroc")]
  assert (r["n"], r["mean"], r["paper"]) == (2, pytest.approx(np.mean(both)), None)
  loco = got[("category", "mvtec_loco", "pushpins", "image_auroc_structural")]
  assert loco["mean"] == pytest.approx(
    np.mean([values[sweep.Job("mvtec_loco", "pushpins", "S", s)][0] + 2 for s in range(2)])
  )
  text = tables.markdown(rows, problems, len(jobs))
  assert "- missing: mvtec_loco/pushpins/S/seed2" in text and "* incomplete" in text


def test_failing_job_is_recorded_and_the_others_go_on(tmp_path):
  jobs = sweep.enumerate_jobs(["mvtec_ad"], ["S"], [0], ["bottle", "cable", "grid"])

  def run_fn(job, out, cfg):
    if job.category == "cable":
      raise RuntimeError("out of memory")
    write_run(out, job, fake_metrics("mvtec_ad", 0.9, 0.8))

  statuses = sweep.run_jobs(jobs, tmp_path, make_config=lambda job: None, run_fn=run_fn)
  assert list(statuses.values()) == ["finished", "failed", "finished"]
  assert "RuntimeError: out of memory" in (jobs[1].run_dir(tmp_path) / "sweep_error.txt").read_text()
  _, problems = sweep.aggregate(jobs, tmp_path)
  assert problems == [(jobs[1], "failed", "RuntimeError: out of memory")]
  args = [
    "--collections",
    "mvtec_ad",
    "--categories",
    "bottle,cable,grid",
    "--sizes",
    "S",
    "--seeds",
    "0",
    "--out",
    str(tmp_path),
  ]
  assert sweep_cli.main(args + ["--aggregate-only"]) == 1  # a failed run makes the exit status non-zero
  assert "- failed: mvtec_ad/cable/S/seed0: RuntimeError: out of memory" in (tmp_path / "results.md").read_text()
  # a retry that succeeds clears the error
  statuses = sweep.run_jobs(
    jobs, tmp_path, lambda job: None, lambda job, out, cfg: write_run(out, job, fake_metrics("mvtec_ad", 0.9, 0.8))
  )
  assert list(statuses.values()) == ["skipped", "finished", "skipped"]
  assert not (jobs[1].run_dir(tmp_path) / "sweep_error.txt").exists()


def test_groups_record_each_members_failure(tmp_path):
  """--members 2: finished runs are skipped, the others go in groups of two; a member's own error fails it alone,
  a group's error every member of the group, and a group left with one job trains it alone (run_fn)."""
  jobs = sweep.enumerate_jobs(["mvtec_ad"], ["S"], [0], ["bottle", "cable", "grid", "tile", "wood", "zipper"])
  write_run(tmp_path, jobs[0], fake_metrics("mvtec_ad", 0.9, 0.8))
  groups, alone = [], []

  def group_fn(group, out, cfgs):
    groups.append([job.category for job in group])
    if any(job.category == "wood" for job in group):
      raise RuntimeError("out of memory")
    for job in group:
      if job.category != "grid":
        write_run(out, job, fake_metrics("mvtec_ad", 0.9, 0.8))
    return {job: "Traceback ...\nTrainingDiverged: step 4" if job.category == "grid" else None for job in group}

  def run_fn(job, out, cfg):
    alone.append(job.category)
    write_run(out, job, fake_metrics("mvtec_ad", 0.9, 0.8))

  statuses = sweep.run_jobs(jobs, tmp_path, lambda job: None, run_fn, members=2, group_fn=group_fn)
  assert groups == [["cable", "grid"], ["tile", "wood"]] and alone == ["zipper"]
  assert list(statuses.values()) == ["skipped", "finished", "failed", "failed", "failed", "finished"]
  _, problems = sweep.aggregate(jobs, tmp_path)
  reasons = {job.category: reason for job, _, reason in problems}
  assert reasons == {"grid": "TrainingDiverged: step 4", "tile": "RuntimeError: out of memory", "wood": reasons["tile"]}


def test_paper_numbers_and_latency_are_in_the_table(tmp_path):
  jobs = sweep.enumerate_jobs(sweep.PAPER_COLLECTIONS, ["S", "M"], [0], ["bottle", "candle", "screw_bag"])
  for job in jobs:
    write_run(tmp_path, job, fake_metrics("mvtec_loco" if job.collection == "mvtec_loco" else "mvtec_ad", 0.9, 0.9))
  bench = tmp_path / "bench.json"
  records = [
    {"size": "small", "dtype": "float32", "latency": {"mean_ms": 9.0}, "throughput": {"images_per_s": 9}},
    {"size": "small", "dtype": "float16", "latency": {"mean_ms": 1.25}, "throughput": {"images_per_s": 700}},
    {"size": "medium", "dtype": "float32", "latency": {"mean_ms": 3.5}},
  ]  # experiments.benchmark's form
  bench.write_text(json.dumps({"environment": {"device": "H100"}, "mode": "inference", "results": records}))
  assert tables.load_benchmark(bench) == {  # half precision preferred, as in the paper's protocol
    "S": {"latency_ms": 1.25, "throughput": 700.0, "dtype": "float16", "device": "H100"},
    "M": {"latency_ms": 3.5, "dtype": "float32", "device": "H100"},
  }
  rows, problems = sweep.aggregate(jobs, tmp_path)
  text = tables.markdown(rows, problems, len(jobs), tables.load_benchmark(bench))
  lines = set(text.splitlines())
  assert "| EfficientAD-S (paper) | 98.8 | 97.5 | 90 | 95.4 | 92.5 | 2.2 | 614 |" in lines
  assert "| EfficientAD-M (paper) | 99.1 | 98.1 | 90.7 | 96 | 93.3 | 4.5 | 269 |" in lines
  assert "| EfficientAD-S (ours) | 90.0 | 90.0 | 90.0 | 90.0 | 90.0 | 1.25 | 700 |" in lines  # 1 seed: no std
  assert "| EfficientAD-M (ours) | 90.0 | 90.0 | 90.0 | 90.0 | 90.0 | 3.5 | – |" in lines
  assert "| LOCO | M (paper) | 94.7 | 86.8 | 90.7 |" in text
  assert "EfficientAD-S: float16 on H100" in text
  assert (
    read_csv(tables.write_report(tmp_path, rows, problems, len(jobs))[1])[("all", "all", "mean", "M", "seg")]["paper"]
    == "93.3"
  )
  with pytest.raises(ValueError, match="no result with a size"):
    bench.write_text(json.dumps({"results": [{"size": "S"}]}))
    tables.load_benchmark(bench)


# --- A real sweep: 4 tiny runs, 2 tasks.


@pytest.fixture(scope="module")
def swept(tmp_path_factory, jax_cache):
  """The two tasks run one after the other as separate processes, as on two machines sharing OUT and a
  compilation cache (the second task compiles nothing). The cache is the session's, shared with other tests'
  tiny runs, so what they compiled already is not compiled again."""
  out = tmp_path_factory.mktemp("sweep")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **jax_cache_env(jax_cache))  # --compilation-cache sets the folder
  codes = [
    subprocess.run(
      [
        sys.executable,
        "-m",
        "experiments.sweep",
        *TINY_ARGS,
        "--out",
        str(out),
        "--compilation-cache",
        str(jax_cache),
        "--task-index",
        str(i),
        "--num-tasks",
        "2",
      ],
      cwd=REPO,
      env=env,
      check=False,
      capture_output=True,
      text=True,
      timeout=600,
    )
    for i in (0, 1)
  ]
  return out, codes


def test_sweep_in_two_tasks_trains_and_evaluates_every_run(swept):
  out, procs = swept
  assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
  assert [p.stderr.count("] run synthetic/") for p in procs] == [2, 2]
  jobs = sweep.enumerate_jobs(["synthetic"], ["S"], [0, 1], ["a", "b"])
  for job in jobs:
    m = json.loads((job.run_dir(out) / "eval" / "metrics.json").read_text())
    assert (m["category"], m["model"]["steps"], m["layout"]) == (job.category, 4, "mvtec_loco")
    saved = json.loads((job.run_dir(out) / "config.json").read_text())
    assert (saved["train"]["seed"], saved["data"]["category"]) == (job.seed, job.category)


def test_sweep_tables_equal_numpy_over_the_run_metrics(swept):
  out, _ = swept
  table = read_csv(out / "results.csv")
  text = (out / "results.md").read_text()
  runs = {
    (c, s): json.loads((out / "runs" / "synthetic" / c / "S" / f"seed{s}" / "eval" / "metrics.json").read_text())[
      "metrics"
    ]
    for c in "ab"
    for s in (0, 1)
  }
  metric = {
    "image_auroc": lambda m: m["mean"]["image_auroc"],
    "seg": lambda m: m["mean"]["au_spro"]["0.05"],
    "spro_logical": lambda m: m["logical"]["au_spro"]["0.05"],
  }
  for name, get in metric.items():
    for c in "ab":
      v = 100 * np.array([get(runs[(c, s)]) for s in (0, 1)])
      r = table[("category", "synthetic", c, "S", name)]
      assert (int(r["n"]), float(r["mean"]), float(r["std"])) == (
        2,
        pytest.approx(v.mean()),
        pytest.approx(v.std(ddof=1)),
      )
    per_seed = 100 * np.array([np.mean([get(runs[(c, s)]) for c in "ab"]) for s in (0, 1)])
    r = table[("collection", "synthetic", "mean", "S", name)]
    assert (float(r["mean"]), float(r["std"])) == (pytest.approx(per_seed.mean()), pytest.approx(per_seed.std(ddof=1)))
    if name == "image_auroc":
      assert f"| EfficientAD-S (ours) | {per_seed.mean():.1f} ± {per_seed.std(ddof=1):.1f} |" in text
  assert "4 of 4 runs finished" in text and "## Missing and failed runs (0)" in text


def test_second_invocation_skips_finished_runs(swept, caplog):
  out, _ = swept
  stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file() and "eval" not in p.parts}
  with caplog.at_level(logging.INFO, logger="efficientad_jax"):
    assert sweep_cli.main(TINY_ARGS + ["--out", str(out)]) == 0
  assert sum("skip synthetic/" in r.getMessage() for r in caplog.records) == 4
  assert not any("saved the model" in r.getMessage() for r in caplog.records)
  assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing retrained or rewritten


# --- The same sweep with --members 2: two groups of two runs, each trained in one program.


def _sweep(out, jax_cache, *args):
  cmd = [sys.executable, "-m", "experiments.sweep", *args, "--out", str(out), "--compilation-cache", str(jax_cache)]
  return cmd, dict(os.environ, JAX_PLATFORMS="cpu", **jax_cache_env(jax_cache))


@pytest.fixture(scope="module")
def members_swept(tmp_path_factory, jax_cache):
  """TINY_ARGS with --members 2 in one process: the groups (a, b) of seed 0 and of seed 1."""
  out = tmp_path_factory.mktemp("sweep_members")
  cmd, env = _sweep(out, jax_cache, *TINY_ARGS, "--members", "2")
  return out, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_members_sweep_writes_the_same_runs_and_table(swept, members_swept):
  """The same run folders and table rows as the one-by-one sweep, every value within 0.01 percentage points: the
  models agree within float rounding (tests/test_members_trainer.py), which moved no metric by more than 1e-14
  here (measured)."""
  (alone, _), (grouped, proc) = swept, members_swept
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("(member ") == 4 and "members in one program" in proc.stderr
  runs = lambda out: sorted(str(p.relative_to(out)) for p in (out / "runs").glob("*/*/*/*/*") if p.name != "data")
  assert runs(grouped) == runs(alone)
  table, ours = read_csv(alone / "results.csv"), read_csv(grouped / "results.csv")
  assert ours.keys() == table.keys()
  for key, row in table.items():
    assert (ours[key]["n"], ours[key]["paper"]) == (row["n"], row["paper"])
    for field in ("mean", "std"):
      assert float(ours[key][field]) == pytest.approx(float(row[field]), abs=0.01, nan_ok=True), (key, field)


def test_a_killed_group_resumes_exactly(members_swept, tmp_path, jax_cache):
  """The first group (a and b, seed 0) killed with SIGKILL once both members have checkpoint 2, then run again:
  both models equal the uninterrupted group's bit for bit (same program, from the compilation cache)."""
  out, _ = members_swept
  cmd, env = _sweep(tmp_path, jax_cache, *TINY_ARGS[:6], "--seeds", "0", "--variant", "tiny", "--members", "2")
  runs = [sweep.Job("synthetic", c, "S", 0).run_dir(tmp_path) for c in "ab"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not all((run / "checkpoints" / "2").exists() for run in runs):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # possibly in the middle of the next asynchronous saves
  proc.wait()
  assert not all((run / "model").exists() for run in runs), "the group finished before it could be killed"
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
  for c, run in zip("ab", runs):
    full = saved_model.load(sweep.Job("synthetic", c, "S", 0).run_dir(out) / "model")
    resumed = saved_model.load(run / "model")
    leaves = [jax.tree_util.tree_leaves(m.detector.params) for m in (full, resumed)]
    for x, y in zip(*leaves):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert resumed.meta["threshold"] == full.meta["threshold"]
    assert (run / "eval" / "metrics.json").exists()
