"""Pictures of results: heatmap overlays (NumPy + PIL + SciPy) and ROC / PR curves (matplotlib).

Overlays need no matplotlib, so the predict CLI works without it; the curves import it lazily and
evaluation skips them, with a warning, when it is not installed.

Colour scale: maps are shown on ONE fixed range for every image, [0, vmax] with vmax = 2 x the decision
threshold by default, so the threshold sits mid-scale and a normal image stays blue (scaling each map to
its own maximum would make every normal image look anomalous). 0 is the normalised level of the
validation q_a quantile (docs/method.md §7.2).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.ndimage
from PIL import Image

# "jet"-like colour stops (blue -> cyan -> green -> yellow -> red) at positions 0, .25, .5, .75, 1.
_STOPS = np.array([[0, 0, 128], [0, 128, 255], [0, 200, 80], [255, 220, 0], [220, 0, 0]], np.float32)
CONTOUR_RGB = (255, 255, 255)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """[H, W] float -> [H, W, 3] uint8: clip((v - vmin) / (vmax - vmin), 0, 1) through the colour stops."""
  values = np.asarray(values, np.float32)
  if not vmax > vmin:  # degenerate range (e.g. a zero threshold): fall back to the data's own range
    vmin, vmax = float(values.min()), float(values.max()) + 1e-6
  t = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0) * (len(_STOPS) - 1)
  lo = np.minimum(np.floor(t).astype(np.int32), len(_STOPS) - 2)
  frac = (t - lo)[..., None]
  return np.round(_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).astype(np.uint8)


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """[H, W] bool -> the inner boundary of the mask's regions, `width` pixels thick (bool [H, W])."""
  mask = np.asarray(mask, bool)
  return mask & ~scipy.ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay(
  rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
  """Image blended with its colour-mapped map, ground truth outlined in white.

  Args:
    rgb: [H, W, 3] uint8 image.
    anomaly_map: [H, W] float map at the image's size.
    vmin, vmax: colour range (module doc).
    mask: optional [H, W] bool ground truth.
    alpha: weight of the heatmap.
  Returns:
    [H, W, 3] uint8.
  """
  if rgb.shape[:2] != anomaly_map.shape:
    raise ValueError(f"image {rgb.shape[:2]} and map {anomaly_map.shape} sizes differ")
  heat = colorize(anomaly_map, vmin, vmax).astype(np.float32)
  out = np.round((1 - alpha) * rgb.astype(np.float32) + alpha * heat).astype(np.uint8)
  if mask is not None and np.any(mask):
    width = max(1, round(min(rgb.shape[:2]) / 256))  # visible on 1024-pixel images, thin on 64
    out[contour(mask, width)] = CONTOUR_RGB
  return out


def side_by_side(*images: np.ndarray) -> np.ndarray:
  """Same-height [H, W_i, 3] uint8 images -> one [H, sum W_i + gaps, 3] strip."""
  gap = np.full((images[0].shape[0], 4, 3), 255, np.uint8)
  parts = []
  for image in images:
    parts += [image, gap]
  return np.concatenate(parts[:-1], axis=1)


def denormalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Network input [S, S, 3] (ImageNet-normalised) -> uint8 RGB [S, S, 3]."""
  rgb = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def resize_rgb(rgb: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """[h, w, 3] uint8 -> [H, W, 3] uint8, bilinear (display only)."""
  if tuple(rgb.shape[:2]) == tuple(hw):
    return rgb
  return np.asarray(Image.fromarray(rgb).resize((int(hw[1]), int(hw[0])), Image.BILINEAR))


def save_png(image: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)
  return path


# --- Curves (matplotlib).


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  return plt


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact precision-recall points (one per distinct score, ties merged), from `metrics.roc_curve`."""
  from efficientad_jax.metrics import roc_curve

  labels = np.asarray(labels) != 0
  fpr, tpr, _ = roc_curve(scores, labels)
  tp, fp = tpr[1:] * labels.sum(), fpr[1:] * (~labels).sum()
  return tpr[1:], tp / (tp + fp)


def plot_curves(
  subsets: Mapping[str, tuple[np.ndarray, np.ndarray]],
  title: str,
  roc_path: str | pathlib.Path,
  pr_path: str | pathlib.Path,
) -> None:
  """Image-level ROC and precision-recall curves, one line per subset.

  Args:
    subsets: name -> (scores [N], labels [N], nonzero = anomalous), e.g. {'all': ...} or LOCO's
      {'structural': ..., 'logical': ...}.
  """
  from efficientad_jax.metrics import auroc, roc_curve

  plt = _pyplot()
  for kind, path in (("roc", roc_path), ("pr", pr_path)):
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for name, (scores, labels) in subsets.items():
      if kind == "roc":
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AU-ROC {100 * auroc(scores, labels):.1f})")
      else:
        recall, precision = pr_curve(scores, labels)
        ax.step(recall, precision, where="post", label=name)
    if kind == "roc":
      ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(
      xlabel="false positive rate" if kind == "roc" else "recall",
      ylabel="true positive rate" if kind == "roc" else "precision",
      xlim=(0, 1),
      ylim=(0, 1.02),
      title=f"{title}: image {kind.upper()}",
    )
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
