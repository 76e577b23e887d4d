"""EfficientAD on MVTec AD, the paper's settings.

  python -m experiments.train --dataset mvtec_ad --size S --set data.root=/data/mvtec_ad \
      --set data.category=bottle --set train.teacher_checkpoint=teachers/small

70,000 steps; expected image AU-ROC over the 15 categories: 98.8 (S) / 99.1 (M), AU-PRO 93-94 (paper, table 1).
"""

from experiments.configs.common import paper


def get_config(arg: str = "small"):
  return paper("mvtec_ad", arg, root="data/mvtec_ad", category="bottle")
