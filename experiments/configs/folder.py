"""EfficientAD on a folder of your own product images: <root>/train/good (+ optional test/, ground_truth/).

python -m experiments.train --dataset folder --set data.root=/data/my_part --set data.penalty=/data/imagenette
"""

from experiments.configs.common import paper


def get_config(arg: str = "small"):
  return paper("folder", arg, root="", category="")
