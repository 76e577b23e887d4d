"""EfficientAD-AST (method 'efficientad_ast'): EfficientNet-B5 features + positional encoding, a conditional
normalizing-flow teacher, a residual conv student and a feature-space autoencoder.

  config.py        AstConfig
  train_step.py    the pure steps of both stages;  trainer.py  train_ast(cfg, workdir) on the shared engine
  inference.py     build(cfg), the one predict path, its saved-model entry (SAVED_MODEL)

Its networks are in efficientad_jax.models: efficientnet.py (torchvision-layout EfficientNet trunk and its .pth
import), flow.py (the conditional affine-coupling flow, positional encoding, NLL), residual_student.py,
feature_autoencoder.py and layers.py (their conv helper).
"""
