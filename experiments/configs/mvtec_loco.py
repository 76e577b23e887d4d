"""EfficientAD on MVTec LOCO AD, the paper's settings (validation/good calibrates the maps).

  python -m experiments.train --dataset mvtec_loco --size M --set data.root=/data/mvtec_loco_anomaly_detection \
      --set data.category=breakfast_box --set train.teacher_checkpoint=teachers/medium

Expected (paper): image AU-ROC 90.0 (S) / 90.7 (M); M: structural 94.7, logical 86.8 AU-ROC.
"""

from experiments.configs.common import paper


def get_config(arg: str = "small"):
  return paper("mvtec_loco", arg, root="data/mvtec_loco_anomaly_detection", category="breakfast_box")
