"""Shared test setup: CPU, highest matmul precision, the reference fixture folder."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after JAX_PLATFORMS)

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]


def fixtures_dir() -> pathlib.Path:
  """The fixture folder: $EFFICIENTAD_FIXTURES, else ../shared/fixtures beside the repo root."""
  path = pathlib.Path(os.environ.get("EFFICIENTAD_FIXTURES", REPO.parent / "shared" / "fixtures"))
  if not (path / "README.md").exists():
    # Fail, never skip: a missing fixture folder must not turn the parity suite green.
    raise FileNotFoundError(
        f"fixture folder {path} not found; set EFFICIENTAD_FIXTURES to a folder in the format of "
        "shared/fixtures/README.md")
  return path


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
  return fixtures_dir()
