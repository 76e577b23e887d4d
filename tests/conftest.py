"""Shared test setup: CPU, highest matmul precision, the reference fixture folder (tests/fixtures)."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after JAX_PLATFORMS)

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]


VENDORED_FIXTURES = REPO / "tests" / "fixtures"


def fixtures_dir() -> pathlib.Path:
  """The fixture folder: $EFFICIENTAD_FIXTURES, else the copy vendored in tests/fixtures."""
  path = pathlib.Path(os.environ.get("EFFICIENTAD_FIXTURES") or VENDORED_FIXTURES)
  if not (path / "README.md").exists():
    # Fail, never skip: a missing fixture folder must not turn the parity suite green.
    raise FileNotFoundError(
        f"fixture folder {path} not found; set EFFICIENTAD_FIXTURES to a folder in the format of "
        "tests/fixtures/README.md")
  return path


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
  return fixtures_dir()


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> pathlib.Path:
  """One persistent XLA compilation cache for the SUBPROCESSES of the whole session: the tiny synthetic runs
  of several tests (sweep, trainer) compile many identical programs, and a cached executable is the same
  executable. The pytest process itself does not use it (tests count its compilations)."""
  return tmp_path_factory.mktemp("jax_cache")


def jax_cache_env(cache: pathlib.Path) -> dict[str, str]:
  """Environment variables that point a subprocess's JAX at `cache`, caching every compilation."""
  return {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
