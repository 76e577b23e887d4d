"""Loading of the reference fixtures (format: tests/fixtures/README.md) for the tests."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from efficientad_jax.models import weights

PDN_KEYS = {"small": (0, 3, 6, 8), "medium": (0, 3, 6, 8, 10, 12)}


def manifest(fixtures: pathlib.Path, name: str) -> dict:
  return json.loads((fixtures / "networks" / name).read_text())


def network_params(fixtures: pathlib.Path, manifest_name: str):
  """Flax params of a fixture network, built from the manifest's recipe and imported in nelson layout."""
  m = manifest(fixtures, manifest_name)
  state = weights.recipe_weights(m)
  if "autoencoder" in manifest_name:
    return weights.autoencoder_params_from_state(state)
  return weights.pdn_params_from_state(state, "small" if "small" in manifest_name else "medium")


def recipe_input(seed: int, j: int, h: int = 256, w: int = 256) -> np.ndarray:
  """The README's input recipe, NCHW -> NHWC."""
  x = np.random.default_rng([seed, 1000 + j]).uniform(-2, 2, (1, 3, h, w)).astype(np.float32)
  return x.transpose(0, 2, 3, 1)


def to_nchw(y) -> np.ndarray:
  return np.asarray(y).transpose(0, 3, 1, 2)


AE_KEYS = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 36, 38)
AE_NAMES = tuple(f"enc{i}" for i in range(1, 7)) + tuple(f"dec{i}" for i in range(1, 9))


def nelson_names(params: dict, prefix: str, keys, names) -> dict[str, np.ndarray]:
  """Flax {'convN': {'kernel', 'bias'}} -> {'<prefix>.<index>.weight' (OIHW), '.bias'} for comparisons."""
  out = {}
  for key, name in zip(keys, names):
    out[f"{prefix}.{key}.weight"] = np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1)
    out[f"{prefix}.{key}.bias"] = np.asarray(params[name]["bias"])
  return out
