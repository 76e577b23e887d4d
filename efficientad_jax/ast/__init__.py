"""EfficientAD-AST (method 'efficientad_ast'): EfficientNet-B5 features + positional encoding, a conditional
normalizing-flow teacher, a residual conv student and a feature-space autoencoder.

  efficientnet.py  torchvision-layout EfficientNet trunk and its .pth import
  flow.py          the conditional affine-coupling flow, positional encoding, NLL
  student.py       the residual student;  autoencoder.py  the feature autoencoder
  method.py        build(cfg), the one predict path, its saved-model entry (SAVED_MODEL)
  train_step.py    pure steps;  trainer.py  train_ast(cfg, workdir)
"""
