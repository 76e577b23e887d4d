"""EfficientAD-AST on MVTec LOCO, the published settings (method 'efficientad_ast').

  python -m experiments.train --method efficientad_ast --dataset mvtec_loco \
      --set data.root=/data/mvtec_loco --set data.category=breakfast_box \
      --set backbone.weights=weights/efficientnet_b5.pth

As ast_mvtec_ad.py; validation normals are LOCO's own validation/good (early stopping and the threshold).
Published: image AU-ROC 73.3, AU-sPRO 73.5 (mean over the 5 objects). Not reproduced in this repository.
"""

from efficientad_jax.config import DataConfig
from efficientad_jax.efficientad_ast.config import AstConfig


def get_config(arg: str = ""):
  del arg  # one size only
  # The penalty (off until data.penalty names a source) is resized to 2 x 768 and centre-cropped, as EfficientAD's.
  return AstConfig(
    data=DataConfig(dataset="mvtec_loco", root="data/mvtec_loco", category="breakfast_box", penalty_resize=2 * 768)
  )
