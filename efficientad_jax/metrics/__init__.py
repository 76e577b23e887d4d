"""Evaluation metrics of EfficientAD (paper §4; docs/method.md §9): NumPy/SciPy only, exact curves, no JAX.

* `roc`: image / pixel AU-ROC and F1 at the F1-optimal threshold.
* `pro`: MVTec AD AU-PRO (8-connected regions, exact curve).
* `spro`: MVTec LOCO AD AU-sPRO (saturated per-region overlap, exact curve).
* `results`: one dict per evaluated category (MVTec AD and MVTec LOCO layouts).
"""

from efficientad_jax.metrics.curves import trapezoid
from efficientad_jax.metrics.pro import (
  PRO_LIMITS,
  au_pro,
  label_regions,
  pro_curve,
)
from efficientad_jax.metrics.results import (
  mvtec_ad_metrics,
  mvtec_loco_metrics,
)
from efficientad_jax.metrics.roc import (
  auroc,
  auroc_and_f1,
  f1_optimal,
  image_auroc,
  image_f1,
  image_scores,
  pixel_auroc,
  pixel_auroc_and_f1,
  pixel_f1,
  roc_curve,
)
from efficientad_jax.metrics.spro import (
  SPRO_LIMITS,
  DefectChannel,
  au_spro,
  channel_from_gt,
  saturation_area,
  spro_curve,
)

__all__ = [
  "PRO_LIMITS",
  "SPRO_LIMITS",
  "DefectChannel",
  "au_pro",
  "au_spro",
  "auroc",
  "auroc_and_f1",
  "channel_from_gt",
  "f1_optimal",
  "image_auroc",
  "image_f1",
  "image_scores",
  "label_regions",
  "mvtec_ad_metrics",
  "mvtec_loco_metrics",
  "pixel_auroc",
  "pixel_auroc_and_f1",
  "pixel_f1",
  "pro_curve",
  "roc_curve",
  "saturation_area",
  "spro_curve",
  "trapezoid",
]
