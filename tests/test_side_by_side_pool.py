"""tools/side_by_side_pool.py: the stratified permutation test against SciPy's (one photograph) and against a
brute-force enumeration (several), its interval, and the pooled report over run folders."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from tools import side_by_side_pool as pool


def test_one_photograph_gives_scipys_exact_permutation_p():
  rng = np.random.default_rng(3)
  for shift in (0.0, 0.4):
    a, b = rng.normal(0.5, 1.0, 4), rng.normal(0.0, 1.0, 4)
    expected = stats.permutation_test(
      (a - shift, b),
      lambda x, y: np.mean(x) - np.mean(y),
      permutation_type="independent",
      alternative="two-sided",
      n_resamples=np.inf,
    ).pvalue
    assert pool.stratified_p([(a, b)], shift) == pytest.approx(expected, abs=1e-12)


def _brute_force_p(groups, shift):
  """Every joint relabelling, one loop per photograph's choice of 'a' runs."""
  pooled_values = [(np.concatenate([a - shift, b]), len(a)) for a, b in groups]

  def statistic(choices):
    total = 0.0
    for (values, _), chosen in zip(pooled_values, choices):
      in_a = np.isin(np.arange(len(values)), chosen)
      total += values[in_a].mean() - values[~in_a].mean()
    return total / len(groups)

  observed = statistic([list(range(n_a)) for _, n_a in pooled_values])
  options = [list(itertools.combinations(range(len(v)), n_a)) for v, n_a in pooled_values]
  null = [statistic([list(c) for c in choice]) for choice in itertools.product(*options)]
  return np.mean(np.abs(null) >= abs(observed) - 1e-12)


def test_several_photographs_match_a_brute_force_enumeration_and_the_drawn_null_is_close():
  rng = np.random.default_rng(4)
  groups = [(rng.normal(1.0, 1.0, 3), rng.normal(0.0, 1.0, 2)), (rng.normal(10.3, 1.0, 2), rng.normal(10.0, 1.0, 3))]
  for shift in (0.0, 0.5, 1.5):
    assert pool.stratified_p(groups, shift) == pytest.approx(_brute_force_p(groups, shift), abs=1e-12)

  big = [(rng.normal(0.3, 1.0, 5), rng.normal(0.0, 1.0, 5)) for _ in range(3)]  # 252^3 relabellings: drawn
  assert math.prod(math.comb(10, 5) for _ in big) > pool.EXACT_UP_TO
  exact = _exact_by_outer_sum(big)
  assert pool.stratified_p(big) == pytest.approx(exact, abs=0.01)


def _exact_by_outer_sum(groups):
  """The exact p of many relabellings, from each photograph's distribution of differences (NumPy by hand)."""
  diffs = []
  for a, b in groups:
    values = np.concatenate([a, b])
    d = []
    for chosen in itertools.combinations(range(len(values)), len(a)):
      mask = np.isin(np.arange(len(values)), chosen)
      d.append(values[mask].mean() - values[~mask].mean())
    diffs.append(np.array(d))
  null = sum(np.meshgrid(*diffs, indexing="ij")).ravel() / len(groups)
  observed = sum(d[0] for d in diffs) / len(groups)
  return np.mean(np.abs(null) >= abs(observed) - 1e-12)


def _write_runs(folder, name, q_ae_by_side, tagged=()):
  (folder / "mvtec" / name).mkdir(parents=True)
  for side, values in q_ae_by_side.items():
    for seed, q in enumerate(values):
      run = folder / f"{side}_seed{seed}"
      run.mkdir()
      result = {"side": side, "seed": seed, "q_ae": [q, 2 * q], "ae_raw_auroc": 0.7 + q, "image_auroc": 0.9}
      (run / "result.json").write_text(json.dumps(result))
  for side in tagged:  # an ablation: must not count
    (folder / f"{side}_seed9").mkdir()
    (folder / f"{side}_seed9" / "result.json").write_text(
      json.dumps({"side": side, "seed": 9, "q_ae": [1.0, 2.0], "ae_raw_auroc": 0.0, "image_auroc": 0.0})
    )


def test_the_pooled_ratio_and_its_interval_over_photographs_of_different_scales(tmp_path, capsys):
  """Ours at half the reference's q_ae on two photographs whose plateaus differ tenfold: the per-photograph
  comparison finds 0.5 and rejects 1; a pooled, unstratified comparison could not."""
  rng = np.random.default_rng(5)
  for name, scale in (("brick", 0.005), ("grass", 0.05)):
    ref = scale * np.exp(rng.normal(0, 0.1, 3))
    ours = 0.5 * scale * np.exp(rng.normal(0, 0.1, 3))
    _write_runs(tmp_path / name, name, {"ours": list(ours), "reference": list(ref)}, tagged=("ours_nodecay",))

  result = pool.pooled(pool.load_runs([tmp_path / "brick", tmp_path / "grass"]))
  assert [r["runs"] for r in result["rows"]] == [[3, 3], [3, 3]]
  assert result["relabellings"] == 400
  low, high = result["q_ae_ratio"]["interval"]
  assert low < 0.5 < high < 1.0
  assert result["q_ae_ratio"]["p_none"] == pytest.approx(2 / 400)  # every ours below every reference run
  assert result["q_ae_ratio"]["ratio"] == pytest.approx(
    math.exp(np.mean([np.log(r["q_ae"][0] / r["q_ae"][1]) for r in result["rows"]]))
  )

  pool.main([str(tmp_path / "brick"), str(tmp_path / "grass")])
  text = capsys.readouterr().out
  assert "| brick | 3 / 3 |" in text and "400 relabellings, exact" in text


def test_a_folder_without_both_sides_is_one_clear_error(tmp_path):
  _write_runs(tmp_path, "gravel", {"ours": [0.01], "reference": []})
  with pytest.raises(SystemExit, match="1 ours, 0 reference"):
    pool.load_runs([tmp_path])
  with pytest.raises(SystemExit):
    pool.main([str(tmp_path / "missing")])

  twice = [tmp_path / "a", tmp_path / "b"]
  for folder in twice:
    _write_runs(folder, "grass", {"ours": [0.01], "reference": [0.02]})
  with pytest.raises(SystemExit, match="holds grass again"):
    pool.load_runs(twice)
