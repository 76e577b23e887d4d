"""EfficientAD-AST on MVTec AD, the published settings (method 'efficientad_ast').

  python -m experiments.train --method efficientad_ast --dataset mvtec_ad \
      --set data.root=/data/mvtec_ad --set data.category=bottle \
      --set backbone.weights=weights/efficientnet_b5.pth

768x768 input, EfficientNet-B5 (torchvision state_dict) cut after features.6 (304 x 24 x 24), flow teacher
240 epochs, student + autoencoder up to 100 epochs (early stopping on validation normals), batch 8.
Published (AST-EfficientAD variant): image / pixel AU-ROC 96.98 / 94.00 over the 15 categories, ~9 img/s.
Not reproduced in this repository (no GPU and no B5 weights were available where it was written).
"""

from efficientad_jax.config import DataConfig
from efficientad_jax.efficientad_ast.config import AstConfig


def get_config(arg: str = ""):
  del arg  # one size only
  # The penalty (off until data.penalty names a source) is resized to 2 x 768 and centre-cropped, as EfficientAD's.
  return AstConfig(data=DataConfig(dataset="mvtec_ad", root="data/mvtec_ad", category="bottle", penalty_resize=2 * 768))
