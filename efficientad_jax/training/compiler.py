"""How this project's entry points are compiled: `jit` = `jax.jit` plus XLA options for the CPU backend.

XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK by default ("individual_convolution" fusions), which
ran the train step's convolutions several times slower than XLA's own Eigen convolutions (measured in
BUILD_NOTES.md, "Performance"). Dots and reductions stay with YNNPACK, where they are fast. Accelerators
get XLA's defaults.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax

# The XLA:CPU default minus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def compiler_options() -> dict[str, Any] | None:
  """CPU_COMPILER_OPTIONS on the CPU backend when this jaxlib accepts them; None (XLA's defaults) otherwise."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except Exception as e:  # another jaxlib: its defaults are still correct
    logging.warning(
      "XLA:CPU options %s not accepted by jax %s (%s); using XLA's defaults", CPU_COMPILER_OPTIONS, jax.__version__, e
    )
    return None
  return dict(CPU_COMPILER_OPTIONS)


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`; for top-level entry points only (JAX
  refuses compiler options on a jit nested in another)."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
