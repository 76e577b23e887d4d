"""Shared test setup: CPU, highest matmul precision, fast XLA compilation, the reference fixture folder
(tests/fixtures)."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run each a few times: LLVM's full optimisation of the generated CPU
# code costs more than it saves there, and level 1 keeps the library kernels fast (BUILD_NOTES.md, "Test
# suite"). The numbers are the same up to float rounding; tests/test_backend.py runs the network and
# full-path fixture tests at XLA's default level too ($EFFICIENTAD_TEST_XLA_DEFAULT=1). Subprocesses inherit
# the flag.
TEST_XLA_FLAGS = "" if os.environ.get("EFFICIENTAD_TEST_XLA_DEFAULT") else "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

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
      f"fixture folder {path} not found; set EFFICIENTAD_FIXTURES to a folder in the format of tests/fixtures/README.md"
    )
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


def devices_env(n: int) -> dict[str, str]:
  """Environment of a subprocess whose JAX sees `n` simulated CPU devices (and the tests' XLA flags)."""
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"}


def jax_cache_env(cache: pathlib.Path) -> dict[str, str]:
  """Environment variables that point a subprocess's JAX at `cache`, caching every compilation."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def _cpu_seconds() -> float:
  """CPU seconds of this process and of its finished children (subprocess tests)."""
  import resource

  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With $EFFICIENTAD_TEST_CPU_LOG set, appends '<cpu seconds> <wall seconds> <test id>' per test (setup,
  call and teardown together) to that file: on a shared machine CPU time ranks the tests where wall time
  cannot (BUILD_NOTES.md, "Test suite time")."""
  log = os.environ.get("EFFICIENTAD_TEST_CPU_LOG")
  if not log:
    return (yield)
  import time

  cpu, wall = _cpu_seconds(), time.perf_counter()
  try:
    return (yield)
  finally:
    with open(log, "a") as f:
      f.write(f"{_cpu_seconds() - cpu:.2f} {time.perf_counter() - wall:.2f} {item.nodeid}\n")
