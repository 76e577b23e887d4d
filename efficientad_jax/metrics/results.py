"""All metrics of one evaluated category as a plain, JSON-serialisable dict (docs/method.md §9)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from efficientad_jax.metrics import curves, pro, roc, spro

LOCO_SPLITS = ("structural", "logical")
_LOCO_ALIASES = {
  "good": "good",
  "structural_anomalies": "structural",
  "structural": "structural",
  "logical_anomalies": "logical",
  "logical": "logical",
}


def _f1_entries(prefix: str, result: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}_{key}": value for key, value in result.items()}


def mvtec_ad_metrics(
  maps: Sequence[np.ndarray] | np.ndarray,
  masks: Sequence[np.ndarray] | np.ndarray,
  labels: Sequence[int] | np.ndarray,
  pro_limits: Iterable[float] = pro.PRO_LIMITS,
) -> dict:
  """MVTec AD-style metrics of one category.

  Args:
    maps: N (H_i, W_i) full-resolution anomaly maps (or an (N, H, W) array).
    masks: N ground-truth masks of the same shapes, nonzero = defect (all zero for good images).
    labels: (N,) image labels, nonzero = anomalous.
    pro_limits: FPR integration limits of the AU-PRO.

  Returns:
    {"image_auroc", "pixel_auroc", "au_pro": {limit: value}, "image_f1", "image_precision",
     "image_recall", "image_threshold", "pixel_f1", "pixel_precision", "pixel_recall",
     "pixel_threshold"}; thresholds are map values (score >= threshold is anomalous).
  """
  maps = curves.as_map_list(maps)
  masks = curves.as_mask_list(masks, maps)
  pixel_auroc, pixel_f1 = roc.pixel_auroc_and_f1(maps, masks)
  result = {
    "image_auroc": roc.image_auroc(maps, labels),
    "pixel_auroc": pixel_auroc,
    "au_pro": pro.au_pro(maps, masks, pro_limits),
  }
  result.update(_f1_entries("image", roc.image_f1(maps, labels)))
  result.update(_f1_entries("pixel", pixel_f1))
  return result


def mvtec_loco_metrics(
  maps: Sequence[np.ndarray] | np.ndarray,
  channels: Sequence[Sequence[spro.DefectChannel | tuple]],
  splits: Sequence[str],
  spro_limits: Iterable[float] = spro.SPRO_LIMITS,
) -> dict:
  """MVTec LOCO AD metrics of one object, per anomaly split and their mean.

  Each split is evaluated on its own anomalous images plus all good images; "mean" averages the two
  splits (as the official metrics.json does).

  Args:
    maps: N (H_i, W_i) full-resolution anomaly maps.
    channels: per image its defect channels (mask, saturation_area); empty for good images.
    splits: (N,) per image "good", "structural_anomalies" or "logical_anomalies" (or "structural",
      "logical").
    spro_limits: FPR integration limits of the AU-sPRO.

  Returns:
    {"structural": {"image_auroc", "au_spro": {limit: value}}, "logical": {...}, "mean": {...}}.
  """
  maps = curves.as_map_list(maps)
  if len(splits) != len(maps) or len(channels) != len(maps):
    raise ValueError(f"got {len(maps)} maps, {len(channels)} channel lists and {len(splits)} splits")
  unknown = sorted({s for s in splits if s not in _LOCO_ALIASES})
  if unknown:
    raise ValueError(f"unknown LOCO splits {unknown}; expected one of {sorted(_LOCO_ALIASES)}")
  names = [_LOCO_ALIASES[s] for s in splits]
  result = {}
  for split in LOCO_SPLITS:
    keep = [i for i, name in enumerate(names) if name in ("good", split)]
    sub_maps = [maps[i] for i in keep]
    sub_channels = [channels[i] for i in keep]
    labels = [names[i] != "good" for i in keep]
    result[split] = {
      "image_auroc": roc.image_auroc(sub_maps, labels),
      "au_spro": spro.au_spro(sub_maps, sub_channels, spro_limits),
    }
  result["mean"] = {
    "image_auroc": float(np.mean([result[s]["image_auroc"] for s in LOCO_SPLITS])),
    "au_spro": {
      limit: float(np.mean([result[s]["au_spro"][limit] for s in LOCO_SPLITS]))
      for limit in result[LOCO_SPLITS[0]]["au_spro"]
    },
  }
  return result
