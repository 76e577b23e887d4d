"""Shared test setup: CPU, highest matmul precision, fast XLA compilation, the reference fixture folder
(tests/fixtures)."""

import contextlib
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
  of several tests (sweep, notebooks, trainer, CLI errors) compile many identical programs, and a cached
  executable is the same executable. Under pytest-xdist both workers share it (the folder beside theirs):
  `jax_cache_env`'s size limit turns on JAX's file lock around every read and write, so a worker never reads
  an entry the other is still writing. The pytest process itself does not use it (tests count its
  compilations)."""
  root = tmp_path_factory.getbasetemp()
  path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax_cache"
  path.mkdir(exist_ok=True)
  return path


def devices_env(n: int) -> dict[str, str]:
  """Environment of a subprocess whose JAX sees `n` simulated CPU devices (and the tests' XLA flags)."""
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"}


JAX_CACHE_LOCK = {"JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}  # a limit = JAX's file lock (jax_cache)


def jax_cache_env(cache: pathlib.Path) -> dict[str, str]:
  """Environment variables that point a subprocess's JAX at `cache`, caching every compilation."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    **JAX_CACHE_LOCK,
  }


# The modules of most CPU time, longest first (BUILD_NOTES.md, "Test suite time": CPU seconds per test). The
# README's `-n 2 --dist loadfile` hands whole modules to the two workers; pytest-xdist queued them by their
# number of tests, so test_trainer.py (7 tests, the longest) started near the end and ran alone while the
# other worker idled. Longest first, the short modules fill in at the end.
LONGEST_MODULES = (  # 2026-12-07, CPU seconds of the whole module (its tests' durations): 270, ~180, ~150, ...
  "test_trainer.py",
  "test_sweep.py",
  "test_benchmark.py",
  "test_train_step.py",
  "test_cli_errors.py",
  "test_ast_training.py",
  "test_full_path.py",
  "test_members_trainer.py",
  "test_members.py",
  "test_tiles.py",
  "test_onnx_export.py",
  "test_reference_training.py",
  "test_notebooks.py",
  "test_backends.py",
  "test_models.py",
)


def pytest_configure(config):
  """xdist's loadfile queue in collection order (pytest_collection_modifyitems), not by number of tests."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """The modules of LONGEST_MODULES first, in that order; every other module and every test within a module
  keep their order (a stable sort)."""
  rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@contextlib.contextmanager
def count_compiles(fun_name: str | None = "jit(predict)"):
  """Yields a list that collects one entry (the function's name) per XLA compilation of `fun_name` inside the
  block; `fun_name=None`: of any function."""
  compiled = []

  def listener(event, secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and fun_name in (None, kwargs.get("fun_name")):
      compiled.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
