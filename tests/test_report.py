"""The review page (efficientad_jax/report.py): its pieces by hand, and the page itself in a real browser.

The browser tests build a page of more than 1,000 images, as a large test set gives, and check in headless
Chromium what a person would do with it: the filters by group and outcome, the order (errors first, then by
score), the thumbnails' lazy loading, the address keeping the view.
"""

import html
import json
import re

import numpy as np
import pytest

from efficientad_jax import pictures, report
from tests import browser

N = 1200  # images on the large page
THRESHOLD = 0.5


def test_outcomes_by_hand():
  assert report.outcome(True, True) == "true positive"
  assert report.outcome(True, False) == "false positive"
  assert report.outcome(False, True) == "false negative"
  assert report.outcome(False, False) == "true negative"
  assert (report.outcome(True, None), report.outcome(False, None)) == ("flagged", "passed")


def page_data(page: str) -> list[dict]:
  return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))


def test_names_cannot_break_the_page(tmp_path):
  """A file name holding '</script>' or markup stays text: the data block cannot be closed by it."""
  name = 'x</script><img src=y onerror="alert(1)">&'
  item = report.Item(name, 0.7, True, float("nan"), "<b>g</b>", None, "f.png", "t.jpg", (4, 4))
  page = report.write(tmp_path / "r.html", "t<i>", [item], THRESHOLD, "given").read_text()
  assert page.count("</script>") == 2  # the data block's and the script's own
  data = page_data(page)
  assert data[0]["name"] == name and data[0]["normalized"] is None  # NaN is not JSON: null
  assert "<b>g</b>" not in page and html.escape("<b>g</b>") in page  # the group option, escaped


def test_histogram_threshold_line_by_hand():
  """The threshold line sits where the axis maps it: left + width * (t - lo) / (hi - lo)."""
  scores = np.array([0.2, 0.4, 0.9])
  svg = report.histogram_svg(scores, np.array([False, False, True]), threshold=0.3)
  top, right, bottom, left = report._M
  width = report._W - left - right
  x = float(re.search(r'<line x1="([0-9.]+)"', svg).group(1))
  assert x == pytest.approx(left + width * (0.3 - 0.2) / (0.9 - 0.2), abs=0.05)
  assert "normal (2)" in svg and "anomalous (1)" in svg


@pytest.fixture(scope="module")
def large(tmp_path_factory):
  """A page of N images: two defect groups and good ones, scores overlapping the threshold, small pictures."""
  out = tmp_path_factory.mktemp("large")
  rng = np.random.default_rng(0)
  items = []
  for i in range(N):
    group = ("good", "scratch", "stain")[i % 3]
    label = group != "good"
    score = float(rng.normal(0.6 if label else 0.4, 0.12))
    amap = np.full((24, 32), score, np.float32)
    rgb = np.full((24, 32, 3), 90, np.uint8)
    panel = pictures.overlay(rgb, amap, 0.0, 2 * THRESHOLD)
    full, thumb, size = report.write_pictures(rgb, panel, out / report.FILES, f"{group}/{i:04d}")
    normalized = 0.5 * score / THRESHOLD
    items.append(report.Item(f"{group}/{i:04d}", score, score > THRESHOLD, normalized, group, label, full, thumb, size))
  page = report.write(out / "report.html", "large", items, THRESHOLD, "given")
  return page, items


def shown(dom: str) -> list[tuple[str, str]]:
  """(outcome class, name) of every card in the gallery, in page order."""
  cards = re.findall(r'<div class="card o-([a-z-]+)">.*?<div class="name">([^<]*)</div>', dom, re.S)
  return [(outcome.replace("-", " "), name) for outcome, name in cards]


def test_large_page_filters_and_order_in_a_browser(large):
  page, items = large
  by_name = {it.name: it for it in items}
  rank = {o: k for k, o in enumerate(("false positive", "false negative", "true positive", "true negative"))}

  every = shown(browser.dom(page))
  assert len(every) == N == len(set(name for _, name in every))
  expected = sorted(items, key=lambda it: (rank[report.outcome(it.anomalous, it.label)], -it.score))
  assert [name for _, name in every] == [it.name for it in expected]  # errors first, then by score
  assert all(o == report.outcome(by_name[n].anomalous, by_name[n].label) for o, n in every)

  fp = shown(browser.dom(page, "#outcome=false%20positive"))
  assert {n for _, n in fp} == {it.name for it in items if it.anomalous and not it.label} and fp

  errors_scratch = shown(browser.dom(page, "#group=scratch&outcome=errors&order=score"))
  want = [it for it in items if it.group == "scratch" and it.anomalous != it.label]
  assert [n for _, n in errors_scratch] == [it.name for it in sorted(want, key=lambda it: -it.score)]

  dom = browser.dom(page)
  assert dom.count('loading="lazy"') == N  # thumbnails load as they scroll into view
  assert f"{N} of {N} images" in dom


def test_axis_ticks_are_round_numbers():
  np.testing.assert_allclose(report.nice_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1])
  np.testing.assert_allclose(report.nice_ticks(0.0123, 3.72), [1, 2, 3])
  np.testing.assert_allclose(report.nice_ticks(-0.5, 0.5), [-0.4, -0.2, 0, 0.2, 0.4])
  assert list(report.nice_ticks(2.0, 2.0)) == [2.0]  # one value: one tick, no division by zero


def test_histogram_shows_the_saved_threshold_beside_a_chosen_one():
  scores, labels = np.array([0.2, 0.4, 0.9]), np.array([False, False, True])
  chosen = report.histogram_svg(scores, labels, threshold=0.3, saved=0.5)
  top, right, bottom, left = report._M
  width = report._W - left - right
  xs = [float(v) for v in re.findall(r'<line x1="([0-9.]+)"', chosen)]
  assert xs == pytest.approx([left + width * (t - 0.2) / 0.7 for t in (0.3, 0.5)], abs=0.05)
  assert "saved 0.5" in chosen
  same = report.histogram_svg(scores, labels, threshold=0.3, saved=0.3)
  assert same.count("<line") == 1 and "saved" not in same  # the default: one line
