"""The sweep's report (docs/method.md §10): the aggregated rows as the paper's tables in Markdown and CSV, with
latency and throughput from a benchmark JSON beside them. `sweep.aggregate` makes the rows."""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from efficientad_jax.evaluation.sweep import METRIC_NAMES, PAPER, SIZES, TITLES, Job


def load_benchmark(path: str | pathlib.Path) -> dict[str, dict]:
  """`python -m experiments.benchmark --out FILE` (inference mode) -> {size: {'latency_ms', 'throughput', 'dtype'}}.

  Reads {"environment": {"device": ...}, "results": [{"size": "small", "dtype": "float16", "latency": {"mean_ms"},
  "throughput": {"images_per_s"}}, ...]} (flat "latency_ms" / "throughput_img_s" numbers also do). Per size the
  half-precision record is taken, as in the paper's protocol, else bfloat16, else the first.
  """
  data = json.loads(pathlib.Path(path).read_text())
  records = data.get("results", []) if isinstance(data, dict) else data
  device = (data.get("environment") or {}).get("device", "") if isinstance(data, dict) else ""
  rank = {"float16": 0, "bfloat16": 1}
  table = {}
  for r in sorted(records, key=lambda r: rank.get(r.get("dtype"), 2)):
    size, lat, thr = SIZES.get(str(r.get("size", "")).lower()), r.get("latency"), r.get("throughput")
    entry = {
      "latency_ms": lat.get("mean_ms") if isinstance(lat, dict) else r.get("latency_ms", lat),
      "throughput": thr.get("images_per_s") if isinstance(thr, dict) else r.get("throughput_img_s", thr),
    }
    entry = {k: float(v) for k, v in entry.items() if v is not None}
    if size and entry and size not in table:
      table[size] = {**entry, "dtype": r.get("dtype", ""), "device": device}
  if not table:
    raise ValueError(f"{path}: no result with a size and a latency or throughput (format: tables.load_benchmark)")
  return table


def _cell(row: dict | None) -> str:
  """'98.1 ± 0.2' (1 decimal, as the paper); the std is left out when undefined (one seed)."""
  if row is None:
    return "–"
  return f"{row['mean']:.1f}" + ("" if np.isnan(row["std"]) else f" ± {row['std']:.1f}")


def _table(head: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body), ""]


def _headline(find: dict, collections: list, sizes: list, incomplete: set, bench: dict) -> list[str]:
  """The paper's table 1 form: one 'ours' and one 'paper' row per size; * marks incomplete means."""
  paper = lambda v: "–" if v is None else f"{v:g}"
  body = []
  for size in sizes:
    ours = [
      _cell(find.get(("collection", c, "mean", size, "image_auroc"))) + "*" * ((c, size) in incomplete)
      for c in collections
    ]
    ours += [
      _cell(find.get(("all", "all", "mean", size, m))) + "*" * any(s == size for _, s in incomplete)
      for m in ("image_auroc", "seg")
    ]
    ours += [f"{bench[size][k]:.3g}" if k in bench.get(size, {}) else "–" for k in ("latency_ms", "throughput")]
    theirs = [paper(PAPER.get((c, size, "image_auroc"))) for c in collections]
    theirs += [paper(find.get(("all", "all", "mean", size, m), {}).get("paper")) for m in ("image_auroc", "seg")]
    theirs += [paper(PAPER.get(("all", size, m))) for m in ("latency_ms", "throughput")]
    body += [[f"EfficientAD-{size} (ours)", *ours], [f"EfficientAD-{size} (paper)", *theirs]]
  head = [
    "model",
    *(TITLES[c] for c in collections),
    "mean image AU-ROC",
    "mean segmentation",
    "latency [ms]",
    "throughput [img/s]",
  ]
  note = ["\\* incomplete: some runs are missing or failed (listed at the end).", ""] if incomplete else []
  note += [
    f"Latency (batch 1) and throughput of EfficientAD-{k}: {v['dtype'] or 'dtype n/a'} on "
    f"{v['device'] or 'an unnamed device'} (benchmark JSON)."
    for k, v in bench.items()
  ]
  note += [""] if bench else []
  return ["## Per collection (the paper's table form)", "", *_table(head, body), *note]


def _loco(find: dict, collections: list, sizes: list) -> list[str]:
  """Structural and logical anomalies of the LOCO-layout collections (image AU-ROC and AU-sPRO)."""
  metrics = ("image_auroc_structural", "image_auroc_logical", "image_auroc", "spro_structural", "spro_logical", "seg")
  body = []
  for c, s in ((c, s) for c in collections for s in sizes if ("collection", c, "mean", s, metrics[0]) in find):
    body.append([TITLES[c], s, *(_cell(find.get(("collection", c, "mean", s, m))) for m in metrics)])
    if PAPER.get((c, s, metrics[0])):
      body.append(
        [TITLES[c], f"{s} (paper)", *(f"{PAPER[(c, s, m)]:g}" if (c, s, m) in PAPER else "–" for m in metrics)]
      )
  head = [
    "collection",
    "size",
    "structural AU-ROC",
    "logical AU-ROC",
    "image AU-ROC",
    "structural AU-sPRO 0.05",
    "logical AU-sPRO 0.05",
    "AU-sPRO 0.05",
  ]
  return ["## LOCO layout: structural and logical anomalies", "", *_table(head, body)] if body else []


def markdown(
  rows: Sequence[dict], problems: Sequence[tuple[Job, str, str]], num_jobs: int, benchmark: dict | None = None
) -> str:
  """The sweep's report: the paper's table, LOCO splits, every category, the missing and failed runs."""
  find = {(r["level"], r["collection"], r["category"], r["size"], r["metric"]): r for r in rows}
  collections = list(dict.fromkeys(r["collection"] for r in rows if r["level"] == "collection"))
  sizes = list(dict.fromkeys(r["size"] for r in rows))
  incomplete = {(job.collection, job.size) for job, _, _ in problems}
  lines = [
    "# EfficientAD reproducibility sweep",
    "",
    f"Values in %: mean ± std over seeds (sample std, ddof 1); {num_jobs - len(problems)} of {num_jobs} "
    "runs finished. Segmentation: AU-PRO up to FPR 0.3 (MVTec AD layout), AU-sPRO up to 0.05 (LOCO "
    "layout, mean of structural and logical). Paper: Batzner et al., WACV 2024 (latency: RTX A6000).",
    "",
    *_headline(find, collections, sizes, incomplete, benchmark or {}),
    *_loco(find, collections, sizes),
    "## Per category",
    "",
  ]
  for c in collections:
    body = [
      [
        r["category"],
        r["size"],
        str(r["n"]),
        _cell(r),
        _cell(find.get(("category", c, r["category"], r["size"], "seg"))),
      ]
      for r in rows
      if (r["level"], r["collection"], r["metric"]) == ("category", c, "image_auroc")
    ]
    lines += [f"### {TITLES[c]}", "", *_table(["category", "size", "seeds", "image AU-ROC", METRIC_NAMES["seg"]], body)]
  lines += [f"## Missing and failed runs ({len(problems)})", ""]
  lines += [f"- {status}: {job}" + (f": {reason}" if reason else "") for job, status, reason in problems]
  return "\n".join(lines + ([] if problems else ["none"]) + [""])


def write_report(
  out: str | pathlib.Path,
  rows: Sequence[dict],
  problems: Sequence[tuple[Job, str, str]],
  num_jobs: int,
  benchmark: dict | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
  """OUT/results.md and OUT/results.csv (one line per level, collection, category, size and metric)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.md").write_text(markdown(rows, problems, num_jobs, benchmark))
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ("level", "collection", "category", "size", "metric", "n", "mean", "std", "paper"))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
  return out / "results.md", out / "results.csv"
