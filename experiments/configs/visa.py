"""EfficientAD on VisA (1cls split), the paper's settings.

  python -m experiments.train --dataset visa --size S --set data.root=/data/visa --set data.category=candle

Expected image AU-ROC over the 12 categories (paper): 97.5 (S) / 98.1 (M).
"""

from experiments.configs.common import paper


def get_config(arg: str = "small"):
  return paper("visa", arg, root="data/visa", category="candle")
