"""efficientad_jax: EfficientAD (Batzner, Heckler, König, WACV 2024) in JAX/Flax. docs/method.md has the method.

The public API, what a notebook or a sweep imports (each name is loaded on first use, so `import
efficientad_jax` and the NumPy-only metrics stay free of JAX until a model is built):

  cfg = efficientad_jax.override(efficientad_jax.Config(), ["data.dataset=mvtec_loco", "data.root=..."])
  model_dir = efficientad_jax.train(cfg, "runs/loco")                  # EfficientAD; train_ast alike
  model = efficientad_jax.load("runs/loco")                            # a saved model of any method
  result = efficientad_jax.predict_file(model, "image.png")            # anomaly map + score + decision
  metrics = efficientad_jax.evaluate_run("runs/loco")                  # the official metrics, files in RUN/eval
  efficientad_jax.export_model("runs/loco", "model.eadx")              # a serialized predict (jax.export)
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {  # name -> (module, attribute); no name may be a submodule's (`from efficientad_jax import evaluate`)
  "Config": ("efficientad_jax.config", "Config"),
  "AstConfig": ("efficientad_jax.efficientad_ast.config", "AstConfig"),
  "DistillConfig": ("efficientad_jax.distillation.config", "DistillConfig"),
  "override": ("efficientad_jax.config", "override"),
  "validate": ("efficientad_jax.config", "validate"),
  "train": ("efficientad_jax.efficientad.trainer", "train"),
  "train_ast": ("efficientad_jax.efficientad_ast.trainer", "train_ast"),
  "load": ("efficientad_jax.serving.saved_model", "load"),
  "predict_image": ("efficientad_jax.serving.predict", "predict_image"),
  "predict_file": ("efficientad_jax.serving.predict", "predict_file"),
  "predict_paths": ("efficientad_jax.serving.predict", "predict_paths"),
  "evaluate_run": ("efficientad_jax.evaluation.evaluate", "evaluate"),
  "distill_teacher": ("efficientad_jax.distillation.trainer", "distill"),
  "export_model": ("efficientad_jax.serving.export", "export_model"),
  "load_exported": ("efficientad_jax.serving.export", "load_exported"),
  "generate_synthetic": ("efficientad_jax.data.synthetic", "generate_synthetic"),
  "make_datasets": ("efficientad_jax.data.api", "make_datasets"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f"module 'efficientad_jax' has no attribute {name!r}")
  module, attribute = _API[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
