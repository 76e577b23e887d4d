"""tools/side_by_side.py types: each branch's image AU-ROC by defect type, against the pairwise count by hand,
from the reference's raw_maps.json (a run folder made here)."""

import json

import numpy as np
import pytest

from tools import side_by_side


def _pairwise_auroc(good, bad):
  """P(defective scores above good) + half the ties, over every pair."""
  g, b = np.asarray(good)[:, None], np.asarray(bad)[None, :]
  return float(np.mean(b > g) + 0.5 * np.mean(b == g))


def _rows(rng, kinds=("good", "patch", "stain"), n=6):
  return [
    {"key": f"{kind}/{i:03d}", "st": float(rng.normal(k)), "ae": float(rng.normal(0.5 * k))}
    for k, kind in enumerate(kinds)
    for i in range(n)
  ]


def test_each_defect_type_is_scored_against_the_good_images_alone():
  rows = _rows(np.random.default_rng(0))
  result = side_by_side.type_aurocs(rows)
  assert sorted(result) == ["ae:patch", "ae:stain", "st:patch", "st:stain"]
  for name, value in result.items():
    branch, defect = name.split(":")
    scores = lambda kind: [r[branch] for r in rows if r["key"].split("/")[0] == kind]
    assert value == pytest.approx(_pairwise_auroc(scores("good"), scores(defect)), abs=1e-12)


def test_the_table_reads_a_reference_run_and_keeps_its_maxima(tmp_path):
  rows = _rows(np.random.default_rng(1))
  run = tmp_path / "reference_seed42"
  run.mkdir()
  (run / "result.json").write_text(json.dumps({"side": "reference", "seed": 42}))
  raw = [{"path": f"/x/mvtec/grass/test/{r['key']}.png", "st_max": r["st"], "ae_max": r["ae"]} for r in rows]
  (run / "raw_maps.json").write_text(json.dumps({"raw": raw}))

  text = side_by_side.type_table(tmp_path)
  expected = side_by_side.type_aurocs(rows)
  assert text.splitlines()[0] == "| side | seed | " + " | ".join(expected) + " |"
  assert text.splitlines()[2] == "| reference | 42 | " + " | ".join(f"{v:.3f}" for v in expected.values()) + " |"
  assert json.loads((tmp_path / "raw_maxima.json").read_text())["reference_seed42"] == rows
  (run / "raw_maps.json").unlink()  # a second table reads the kept maxima
  assert side_by_side.type_table(tmp_path) == text
