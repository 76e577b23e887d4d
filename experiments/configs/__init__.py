"""The named experiment configs: (method, dataset) -> a module whose `get_config(arg)` builds the config.

`get(method, dataset, arg)` is what `experiments.train --method/--dataset` and `experiments.distill_teacher`
use; `experiments.train --config FILE` still loads any file with a `get_config`.
"""

from collections.abc import Sequence
from typing import Any

from efficientad_jax.config import ConfigError
from experiments.configs import (
  ast_mvtec_ad,
  ast_mvtec_loco,
  ast_synthetic,
  distill,
  folder,
  mvtec_ad,
  mvtec_loco,
  synthetic,
  visa,
)

REGISTRY = {
  ("efficientad", "synthetic"): synthetic,
  ("efficientad", "mvtec_ad"): mvtec_ad,
  ("efficientad", "mvtec_loco"): mvtec_loco,
  ("efficientad", "visa"): visa,
  ("efficientad", "folder"): folder,
  ("efficientad_ast", "synthetic"): ast_synthetic,
  ("efficientad_ast", "mvtec_ad"): ast_mvtec_ad,
  ("efficientad_ast", "mvtec_loco"): ast_mvtec_loco,
  ("distill", "imagenet"): distill,
}


def names(methods: Sequence[str] = ()) -> str:
  """'method: dataset, ...; ...' of the registered configs (of `methods`, default all), for messages."""
  methods = methods or dict.fromkeys(m for m, _ in REGISTRY)
  return "; ".join(f"{m}: {', '.join(d for mm, d in REGISTRY if mm == m)}" for m in methods)


def get(method: str, dataset: str, arg: str = "") -> Any:
  """`get_config(arg)` of the config named (method, dataset); an unknown name is a one-line ConfigError."""
  module = REGISTRY.get((method, dataset))
  if module is None:
    raise ConfigError(
      f"no config for method {method!r} on dataset {dataset!r} (--method/--dataset, or --config "
      f"FILE); configs: {names()}"
    )
  return module.get_config(arg)
