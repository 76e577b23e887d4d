"""One HTML page per evaluation or prediction: what a person reviewing a detector looks at (NumPy + PIL).

  items = [report.Item(name, score, anomalous, normalized, group, label, full, thumb, size), ...]
  report.write(out / "report.html", title, items, threshold, threshold_rule, tables=..., curves=...)

The page opens from the file system with no server and no network: its styles, script and plots (SVG drawn
here from the scores) are inline, and its pictures lie beside it in report_files/ (per image a JPEG thumbnail
and a full-size image | overlay, written by `write_pictures`). Thumbnails load lazily as they scroll into view, so a
page of thousands of images opens at once. Sections:

  * the metrics tables and facts given by the caller (model, threshold and how it was chosen);
  * ROC and precision-recall curves, when ground truth is known;
  * the score distribution (normal and anomalous images apart when labelled) with the threshold drawn in;
  * the gallery of every image (overlay thumbnail, score, normalised score, decision, group = defect type or
    folder, outcome), false positives and false negatives at the threshold first, then by score; filterable by
    group and outcome; a filtered view is kept in the address (#group=...&outcome=...), so it can be shared.

Colours of the overlays: `pictures.overlay` on one fixed range [0, 2 x threshold] for every image.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from efficientad_jax import metrics, pictures

FILES = "report_files"  # the pictures' folder, beside the page
THUMB_SIDE = 224  # px, the longer side of a gallery thumbnail
JPEG_QUALITY = 90
NORMAL_RGB, ANOMALOUS_RGB, CURVE_RGB = "#2f6fb3", "#c8322c", "#1b8a5a"
OUTCOMES = ("false positive", "false negative", "true positive", "true negative", "flagged", "passed")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image of the gallery. Paths are relative to the page."""

  name: str
  score: float
  anomalous: bool  # the decision: score > threshold
  normalized: float  # `serving.thresholds.normalized` (NaN when the model holds no validation scores)
  group: str  # defect type, or the folder of a predicted file
  label: bool | None  # ground truth anomalous; None when unknown (predict)
  full: str  # the full-size overlay
  thumb: str  # the thumbnail
  thumb_size: tuple[int, int]  # (width, height) of the thumbnail, so the gallery's layout does not jump


def outcome(anomalous: bool, label: bool | None) -> str:
  """'false positive' etc. at the threshold; 'flagged' / 'passed' without ground truth."""
  if label is None:
    return "flagged" if anomalous else "passed"
  return f"{'true' if anomalous == label else 'false'} {'positive' if anomalous else 'negative'}"


# --- Pictures.


def _save(image: Image.Image, folder: pathlib.Path, kind: str, stem: str) -> str:
  """folder/<kind>/<stem>.jpg; returns its path relative to folder's parent (the page's folder)."""
  path = folder / kind / f"{stem}.jpg"
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, quality=JPEG_QUALITY)
  return path.relative_to(folder.parent).as_posix()


def write_thumbnail(panel: np.ndarray, folder: pathlib.Path, stem: str) -> tuple[str, tuple[int, int]]:
  """folder/thumbs/<stem>.jpg: the overlay `panel` ([H, W, 3] uint8, `pictures.overlay`) at most THUMB_SIDE px.

  Args:
    folder: the pictures' folder (the page's report_files/).
    stem: file name without suffix; may hold '/' (subfolders, e.g. 'test/scratch/000').
  Returns:
    (its path relative to folder's parent, its (width, height)).
  """
  thumb = Image.fromarray(panel)
  thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
  return _save(thumb, folder, "thumbs", stem), thumb.size


def write_pictures(
  rgb: np.ndarray, panel: np.ndarray, folder: pathlib.Path, stem: str
) -> tuple[str, str, tuple[int, int]]:
  """folder/full/<stem>.jpg (image | overlay, full size) and the thumbnail (`write_thumbnail`).

  Args:
    rgb: [H, W, 3] uint8, the image at the map's size.
    panel: its overlay (`pictures.overlay`, ground truth outlined where known).
  Returns:
    (full path, thumbnail path, thumbnail (width, height)); paths relative to folder's parent.
  """
  full = _save(Image.fromarray(pictures.side_by_side(rgb, panel)), folder, "full", stem)
  return (full, *write_thumbnail(panel, folder, stem))


# --- Plots (inline SVG; no plotting library).

_W, _H, _M = 340, 280, (18, 26, 44, 50)  # width, height, margins (top, right, bottom, left)


def nice_ticks(lo: float, hi: float, most: int = 6) -> np.ndarray:
  """Round tick positions in [lo, hi]: multiples of 1, 2 or 5 x 10^k, at most `most` of them."""
  span = hi - lo
  if not span > 0:
    return np.asarray([lo])
  for step in sorted(m * 10.0**k for k in range(math.floor(math.log10(span / most)), 20) for m in (1, 2, 5)):
    ticks = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
    if len(ticks) <= most:
      return np.round(ticks, 12)
  return np.asarray([lo, hi])


def _frame(title: str, xlabel: str, ylabel: str, xlim: tuple[float, float], ylim: tuple[float, float]) -> tuple:
  top, right, bottom, left = _M
  pw, ph = _W - left - right, _H - top - bottom

  def x(v):
    return left + pw * (np.asarray(v, float) - xlim[0]) / (xlim[1] - xlim[0])

  def y(v):
    return top + ph * (1 - (np.asarray(v, float) - ylim[0]) / (ylim[1] - ylim[0]))

  ticks = []
  for t in nice_ticks(*xlim):
    ticks.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:.4g}</text>')
  for t in nice_ticks(*ylim):
    ticks.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
  head = (
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">'
    f"<title>{html.escape(title)}</title>"
    f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>'
    + "".join(ticks)
    + f'<text x="{left + pw / 2}" y="{_H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>'
    + f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
  )
  return head, x, y


def _polyline(xs: np.ndarray, ys: np.ndarray, color: str, dash: str = "") -> str:
  points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys))
  style = f' stroke-dasharray="{dash}"' if dash else ""
  return f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"{style}/>'


_SERIES = (CURVE_RGB, "#7a4fb0", "#d08a12")  # one colour per subset (LOCO: structural, logical)


def roc_svg(subsets: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
  """Image-level ROC curves, one per subset {name: (scores, labels)}, AU-ROC in the legend."""
  head, x, y = _frame("ROC", "false-positive rate", "true-positive rate", (0, 1), (0, 1))
  body = [_polyline(x([0, 1]), y([0, 1]), "#bbb", "4 4")]
  for k, (name, (scores, labels)) in enumerate(subsets.items()):
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    body.append(_polyline(x(fpr), y(tpr), _SERIES[k % 3]))
    legend = f"{name}: AU-ROC {100 * metrics.auroc(scores, labels):.1f} %"
    body.append(
      f'<text x="{x(0.97):.1f}" y="{y(0.06 + 0.08 * k):.1f}" text-anchor="end" fill="{_SERIES[k % 3]}">'
      f"{html.escape(legend)}</text>"
    )
  return head + "".join(body) + "</svg>"


def pr_svg(subsets: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
  """Image-level precision-recall curves (`pictures.pr_curve`), one per subset."""
  head, x, y = _frame("precision-recall", "recall", "precision", (0, 1), (0, 1))
  body = []
  for k, (name, (scores, labels)) in enumerate(subsets.items()):
    recall, precision = pictures.pr_curve(scores, labels)
    body.append(_polyline(x(np.r_[0.0, recall]), y(np.r_[precision[0], precision]), _SERIES[k % 3]))
    body.append(
      f'<text x="{x(0.03):.1f}" y="{y(0.06 + 0.08 * k):.1f}" fill="{_SERIES[k % 3]}">{html.escape(name)}</text>'
    )
  return head + "".join(body) + "</svg>"


def histogram_svg(
  scores: np.ndarray, labels: np.ndarray | None, threshold: float, bins: int = 40, saved: float | None = None
) -> str:
  """The score distribution (normal and anomalous apart when labels are known), the threshold in use (black,
  dashed) and, when another one was chosen, the model's saved threshold (grey, dotted)."""
  scores = np.asarray(scores, float)
  lines = [threshold] if saved is None or saved == threshold else [threshold, saved]
  lo, hi = float(min(scores.min(), *lines)), float(max(scores.max(), *lines))
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)
  groups = (
    [("images", scores, NORMAL_RGB)]
    if labels is None
    else [("normal", scores[~labels], NORMAL_RGB), ("anomalous", scores[labels], ANOMALOUS_RGB)]
  )
  counts = [np.histogram(s, edges)[0] for _, s, _ in groups]
  top = max(1, max(int(c.max()) for c in counts))
  head, x, y = _frame("score distribution", "image score", "images", (lo, hi), (0, top))
  body = []
  for (_, _, color), c in zip(groups, counts):
    for a, b, n in zip(edges[:-1], edges[1:], c):
      if n:
        body.append(
          f'<rect x="{x(a):.1f}" y="{y(n):.1f}" width="{max(1.0, x(b) - x(a) - 1):.1f}" '
          f'height="{y(0) - y(n):.1f}" fill="{color}" fill-opacity="0.55"/>'
        )
  tx = x(threshold)
  body.append(
    f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y(0):.1f}" y2="{y(top):.1f}" stroke="#111" stroke-width="2" '
    'stroke-dasharray="6 3"/>'
  )
  body.append(f'<text x="{tx + 4:.1f}" y="{y(top) + 12:.1f}">threshold {threshold:.4g}</text>')
  if len(lines) > 1:
    sx = x(saved)
    body.append(
      f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{y(0):.1f}" y2="{y(top):.1f}" stroke="#888" stroke-width="2" '
      'stroke-dasharray="2 3"/>'
    )
    body.append(f'<text x="{sx + 4:.1f}" y="{y(top) + 52:.1f}" fill="#666">saved {saved:.4g}</text>')
  for k, (name, s, color) in enumerate(groups):
    body.append(
      f'<text x="{x(hi) - 4:.1f}" y="{y(top) + 28 + 14 * k:.1f}" text-anchor="end" fill="{color}">'
      f"{html.escape(name)} ({len(s)})</text>"
    )
  return head + "".join(body) + "</svg>"


# --- The page.


@dataclasses.dataclass(frozen=True)
class Table:
  caption: str
  header: Sequence[str]
  rows: Sequence[Sequence[str]]


def _table_html(t: Table) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.header)
  rows = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in t.rows)
  return (
    f"<table><caption>{html.escape(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
  )


def _cell(value: object) -> str:
  """A table cell; numbers right-aligned."""
  text = str(value)
  try:
    float(text)
  except ValueError:
    return f"<td>{html.escape(text)}</td>"
  return f'<td class="num">{html.escape(text)}</td>'


def _number(v: float) -> float | None:
  return float(v) if math.isfinite(v) else None  # JSON has no NaN


def _data(items: Sequence[Item]) -> str:
  """The gallery's data as JSON, safe inside a <script> element ('</' cannot close it)."""
  rows = [
    {
      "name": it.name,
      "score": float(it.score),
      "normalized": _number(it.normalized),
      "anomalous": bool(it.anomalous),
      "group": it.group,
      "outcome": outcome(it.anomalous, it.label),
      "full": it.full,
      "thumb": it.thumb,
      "w": int(it.thumb_size[0]),
      "h": int(it.thumb_size[1]),
    }
    for it in items
  ]
  return json.dumps(rows).replace("</", "<\\/")


def write(
  path: str | pathlib.Path,
  title: str,
  items: Sequence[Item],
  threshold: float,
  threshold_rule: str,
  tables: Sequence[Table] = (),
  facts: Sequence[tuple[str, str]] = (),
  curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
  saved_threshold: float | None = None,
) -> pathlib.Path:
  """Writes the page (module doc). `curves`: {subset name: (scores, labels)} with both classes present;
  the score distribution separates normal and anomalous images when every item has a label, and shows
  `saved_threshold` beside the threshold in use when they differ."""
  path = pathlib.Path(path)
  scores = np.asarray([it.score for it in items], float)
  labelled = bool(items) and all(it.label is not None for it in items)
  labels = np.asarray([bool(it.label) for it in items]) if labelled else None
  plots = []
  if curves:
    plots += [roc_svg(curves), pr_svg(curves)]
  if len(items):
    plots.append(histogram_svg(scores, labels, threshold, saved=saved_threshold))
  facts = [*facts, ("threshold", f"{threshold:.6g} ({threshold_rule}); anomalous if score > threshold")]
  groups = sorted({it.group for it in items})
  present = [o for o in OUTCOMES if any(outcome(it.anomalous, it.label) == o for it in items)]
  options = lambda values: "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
  page = _PAGE.format(
    title=html.escape(title),
    facts="".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts),
    tables="".join(_table_html(t) for t in tables),
    plots="".join(f'<figure class="plot">{svg}</figure>' for svg in plots),
    groups=options(groups),
    outcomes=options(["errors", *present]) if labelled else options(present),
    data=_data(items),
    style=_STYLE,
    script=_SCRIPT,
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(path)  # a reader never sees half a page
  return path


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#f6f6f4}
h1{font-size:20px;margin:0 0 8px} h2{font-size:16px;margin:20px 0 8px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0}
dt{color:#666} dd{margin:0}
table{border-collapse:collapse;margin:8px 16px 8px 0;background:#fff;display:inline-table}
caption{text-align:left;color:#666;padding:2px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#eee} td.num{text-align:right}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plot{margin:0;background:#fff;border:1px solid #ddd}
svg text{font:11px system-ui,sans-serif;fill:#333}
.controls{position:sticky;top:0;background:#f6f6f4;padding:8px 0;z-index:1;display:flex;gap:16px;align-items:center}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(236px,1fr));gap:10px}
.card{background:#fff;border:3px solid #ccc;border-radius:4px;padding:4px;font-size:12px}
.card img{display:block;width:100%;height:auto;background:#ddd}
.card .name{overflow-wrap:anywhere;color:#444}
.card b{font-size:13px}
.o-false-positive{border-color:#e08a00} .o-false-negative{border-color:#8a3fc0}
.o-true-positive,.o-flagged{border-color:#c8322c} .o-true-negative,.o-passed{border-color:#5a9a6a}
"""

_SCRIPT = """
const items = JSON.parse(document.getElementById('data').textContent);
const rank = {'false positive':0,'false negative':1,'true positive':2,'true negative':3,'flagged':2,'passed':3};
const $ = id => document.getElementById(id);
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  for (const k of ['group','outcome','order']) if (h.has(k)) $(k).value = h.get(k);
}
function card(it) {
  const c = document.createElement('div');
  c.className = 'card o-' + it.outcome.replace(' ', '-');
  const a = document.createElement('a'); a.href = it.full; a.target = '_blank';
  const img = document.createElement('img');
  img.loading = 'lazy'; img.decoding = 'async'; img.src = it.thumb; img.width = it.w; img.height = it.h;
  img.alt = it.name; a.appendChild(img); c.appendChild(a);
  const t = document.createElement('div');
  const norm = it.normalized === null ? '' : ' (normalised ' + it.normalized.toFixed(3) + ')';
  const b = document.createElement('b'); b.textContent = it.score.toPrecision(4) + norm;
  t.appendChild(b);
  t.appendChild(document.createElement('br'));
  t.appendChild(document.createTextNode(it.outcome + ' \\u00b7 ' + it.group));
  const n = document.createElement('div'); n.className = 'name'; n.textContent = it.name;
  t.appendChild(n); c.appendChild(t);
  return c;
}
function render() {
  const g = $('group').value, o = $('outcome').value, order = $('order').value;
  let shown = items.filter(it => (!g || it.group === g) &&
    (!o || it.outcome === o || (o === 'errors' && it.outcome.startsWith('false'))));
  shown.sort((p, q) => (order === 'errors' ? rank[p.outcome] - rank[q.outcome] : 0) || q.score - p.score);
  $('gallery').replaceChildren(...shown.map(card));
  $('count').textContent = shown.length + ' of ' + items.length + ' images';
  const h = new URLSearchParams();
  for (const k of ['group','outcome','order']) if ($(k).value) h.set(k, $(k).value);
  history.replaceState(null, '', '#' + h.toString());
}
readHash();
for (const k of ['group','outcome','order']) $(k).addEventListener('change', render);
window.addEventListener('hashchange', () => { readHash(); render(); });
render();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body>
<h1>{title}</h1>
<dl>{facts}</dl>
{tables}
<div class="plots">{plots}</div>
<h2>Images</h2>
<div class="controls">
<label>group <select id="group"><option value="">all</option>{groups}</select></label>
<label>outcome <select id="outcome"><option value="">all</option>{outcomes}</select></label>
<label>order <select id="order"><option value="errors">errors first, then by score</option>
<option value="score">by score</option></select></label>
<span id="count"></span>
</div>
<div id="gallery"></div>
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""
