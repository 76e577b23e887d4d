"""Pools side-by-side runs over several photographs (BUILD_NOTES.md, "The autoencoder branch").

One pair of runs per photograph reads a q_ae ratio to about ±25 %; the photographs differ from each other by far
more (brick's plateau q_ae is half grass's). So runs are compared within their photograph and the photographs are
then pooled: a stratified permutation test, the side labels shuffled within each photograph, exact when the
relabellings are few (a few pairs per photograph give hundreds), otherwise 100,000 seeded draws.

  python -m tools.side_by_side_pool /tmp/sbsg /tmp/sbsb /tmp/sbsr      # folders of `tools.side_by_side` runs

Per photograph: the runs of each side, the geometric mean of q_ae(0.9) (the 0.9 quantile of the raw
student-autoencoder map on the validation images) and the ratio ours / reference; the mean image AU-ROC of the raw
autoencoder map's maximum ("global raw") and of the combined map. Pooled: the mean over photographs of the
per-photograph differences (of log q_ae; of the AU-ROCs), with its 95 % interval (every shift the test does not
reject at 5 %) and the p-value of no difference. Only untagged runs count (an ablation's side is "ours_<tag>").
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import sys

import numpy as np

from tools.side_by_side import category

SIDES = ("ours", "reference")
EXACT_UP_TO = 100_000  # relabellings enumerated exactly; beyond, that many seeded random draws
ALPHA = 0.05


def load_runs(outs: list[pathlib.Path]) -> dict[str, dict[str, list[dict]]]:
  """{photograph: {"ours": [result, ...], "reference": [...]}} over each folder's untagged finished runs."""
  runs: dict[str, dict[str, list[dict]]] = {}
  for out in outs:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    by_side = {side: [r for r in results if r["side"] == side] for side in SIDES}
    if not all(by_side.values()):
      counts = ", ".join(f"{len(v)} {k}" for k, v in by_side.items())
      raise SystemExit(f"error: {out} has {counts} finished run(s); each folder needs at least one of each side")
    name = category(out)
    if name in runs:
      raise SystemExit(f"error: {out} holds {name} again; give each photograph's runs in one folder")
    runs[name] = by_side
  return runs


def _relabellings(n_a: int, n_b: int) -> np.ndarray:
  """(C(n_a + n_b, n_a), n_a + n_b): every assignment of n_a 'a' labels, as weights 1/n_a (a) and -1/n_b (b)."""
  rows = []
  for chosen in itertools.combinations(range(n_a + n_b), n_a):
    w = np.full(n_a + n_b, -1.0 / n_b)
    w[list(chosen)] = 1.0 / n_a
    rows.append(w)
  return np.array(rows)


def stratified_p(groups: list[tuple[np.ndarray, np.ndarray]], shift: float = 0.0, seed: int = 0) -> float:
  """Two-sided p-value of "a - shift and b come from one distribution in every group".

  Statistic: the mean over groups of mean(a - shift) - mean(b); its null distribution takes the labels a / b
  permuted within each group, all relabellings when there are at most EXACT_UP_TO, else that many draws (seeded).
  """
  weights = [_relabellings(len(a), len(b)) for a, b in groups]
  diffs = [
    w @ np.concatenate([np.asarray(a, float) - shift, np.asarray(b, float)]) for w, (a, b) in zip(weights, groups)
  ]
  observed = sum(d[0] for d in diffs) / len(diffs)  # combinations() yields the observed labelling first
  if math.prod(len(d) for d in diffs) <= EXACT_UP_TO:
    null = np.zeros(1)
    for d in diffs:
      null = (null[:, None] + d[None, :]).ravel()
  else:
    rng = np.random.default_rng(seed)
    null = sum(d[rng.integers(0, len(d), EXACT_UP_TO)] for d in diffs)
  null = null / len(diffs)
  return float(np.mean(np.abs(null) >= abs(observed) - 1e-12 * max(1.0, abs(observed))))


def interval(groups: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> tuple[float, float] | None:
  """The smallest and largest shift on `grid` that stratified_p does not reject at ALPHA (None: all rejected)."""
  kept = [s for s in grid if stratified_p(groups, s) > ALPHA]
  return (float(min(kept)), float(max(kept))) if kept else None


def pooled(runs: dict[str, dict[str, list[dict]]]) -> dict:
  """The per-photograph rows and the pooled differences (q_ae as a ratio, the AU-ROCs as differences)."""

  def groups(value):
    return [tuple(np.array([value(r) for r in sides[s]]) for s in SIDES) for sides in runs.values()]

  log_q = groups(lambda r: math.log(r["q_ae"][0]))
  global_raw, combined = groups(lambda r: r["ae_raw_auroc"]), groups(lambda r: r["image_auroc"])
  rows = [
    {
      "photograph": name,
      "runs": [len(sides[s]) for s in SIDES],
      "q_ae": [float(np.exp(g.mean())) for g in lq],
      "global_raw": [float(g.mean()) for g in gr],
      "combined": [float(g.mean()) for g in cb],
    }
    for name, sides, lq, gr, cb in zip(runs, runs.values(), log_q, global_raw, combined)
  ]

  def summary(gs, grid):
    return {
      "difference": float(np.mean([a.mean() - b.mean() for a, b in gs])),
      "interval": interval(gs, grid),
      "p_none": stratified_p(gs),
    }

  q = summary(log_q, np.arange(-2.5, 2.5, 0.002))
  ratio = {
    "ratio": math.exp(q["difference"]),
    "interval": tuple(math.exp(v) for v in q["interval"]) if q["interval"] else None,
    "p_none": q["p_none"],
  }
  auroc_grid = np.arange(-0.5, 0.5, 0.001)
  relabellings = math.prod(math.comb(len(a) + len(b), len(a)) for a, b in log_q)
  return {
    "rows": rows,
    "relabellings": relabellings,
    "q_ae_ratio": ratio,
    "global_raw_difference": summary(global_raw, auroc_grid),
    "combined_difference": summary(combined, auroc_grid),
  }


def _span(iv, fmt: str) -> str:
  return "every shift on the grid rejected" if iv is None else f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def report(result: dict) -> str:
  lines = [
    "| photograph | runs ours / reference | q_ae(0.9) ours / reference (geometric mean) | ratio | "
    "global raw ours / reference | combined image AU-ROC ours / reference |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    (qo, qr), (go, gr), (co, cr) = r["q_ae"], r["global_raw"], r["combined"]
    lines.append(
      f"| {r['photograph']} | {r['runs'][0]} / {r['runs'][1]} | {qo:.4f} / {qr:.4f} | {qo / qr:.2f} | "
      f"{go:.3f} / {gr:.3f} | {co:.3f} / {cr:.3f} |"
    )
  q, g, c = result["q_ae_ratio"], result["global_raw_difference"], result["combined_difference"]
  how = "exact" if result["relabellings"] <= EXACT_UP_TO else f"{EXACT_UP_TO:,} draws"
  lines += [
    "",
    f"Pooled over {len(result['rows'])} photograph(s), side labels permuted within each "
    f"({result['relabellings']:,} relabellings, {how}); intervals {1 - ALPHA:.0%}:",
    f"- q_ae(0.9) ratio ours / reference {q['ratio']:.2f}, interval {_span(q['interval'], '.2f')}, "
    f"p(ratio 1) = {q['p_none']:.3f}",
    f"- global raw AU-ROC ours - reference {g['difference']:+.3f}, interval {_span(g['interval'], '+.3f')}, "
    f"p(no difference) = {g['p_none']:.3f}",
    f"- combined image AU-ROC ours - reference {c['difference']:+.3f}, interval {_span(c['interval'], '+.3f')}, "
    f"p(no difference) = {c['p_none']:.3f}",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("outs", nargs="+", type=pathlib.Path, help="side-by-side folders, one photograph each")
  args = p.parse_args(argv)
  for out in args.outs:
    if not out.is_dir():
      p.error(f"{out} is not a folder (a `tools.side_by_side` --out folder is expected)")
  print(report(pooled(load_runs(args.outs))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
