"""compiler.jit: the XLA:CPU options reach the compiler, and a jaxlib that lacks them falls back to defaults;
the fixture tests also pass at XLA's default optimisation level (the suite compiles at level 1, conftest)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efficientad_jax.training import compiler
from tests.conftest import REPO


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_convolutions_stay_out_of_ynnpack_and_numbers_are_unchanged():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 20, 20, 16)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(4, 4, 16, 32)).astype(np.float32))
  assert compiler.compiler_options() == compiler.CPU_COMPILER_OPTIONS
  compiled = compiler.jit(_conv).lower(x, w).compile().as_text()
  assert "convolution(" in compiled and "__ynn_fusion" not in compiled
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  reference = sum(
    np.einsum("bhwc,co->bhwo", xn[:, i : i + 17, j : j + 17], wn[i, j]) for i in range(4) for j in range(4)
  )
  np.testing.assert_allclose(np.asarray(compiler.jit(_conv)(x, w)), reference, rtol=1e-4, atol=1e-4)


def test_unknown_options_fall_back_to_xla_defaults(monkeypatch, caplog):
  monkeypatch.setattr(compiler, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_here": "1"})
  compiler.compiler_options.cache_clear()
  try:
    if jax.default_backend() == "cpu":
      assert compiler.compiler_options() is None
      assert "not accepted" in caplog.text
    assert float(compiler.jit(lambda v: v * 2)(jnp.float32(3))) == 6.0
  finally:
    compiler.compiler_options.cache_clear()


def test_fixture_parity_at_the_default_optimisation_level():
  env = dict(
    os.environ,
    EFFICIENTAD_TEST_XLA_DEFAULT="1",
    XLA_FLAGS=os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=1", ""),
  )
  tests = [
    "tests/test_models.py::test_every_fixture_case_matches_reference",
    "tests/test_full_path.py::test_predict_maps_and_scores",
  ]
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "2 passed" in proc.stdout.splitlines()[-1]
