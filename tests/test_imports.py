"""The package's layers: the import contracts of pyproject.toml ([tool.importlinter]: no import cycles at any
depth, networks below training and serving, NumPy-only metrics, ...), the lazily loaded public API, and module
names that shadow nothing."""

import pathlib
import pkgutil
import subprocess
import sys

import efficientad_jax
from tests.conftest import REPO

PACKAGE = "efficientad_jax"


def package_modules() -> list[str]:
  return [PACKAGE] + [m.name for m in pkgutil.walk_packages(efficientad_jax.__path__, PACKAGE + ".")]


def _lint_imports(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
  proc = _lint_imports(REPO)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "0 broken" in proc.stdout


def test_import_contracts_catch_a_cycle_and_a_forbidden_import(tmp_path):
  """The two kinds of contract this project relies on fail on a package that breaks them."""
  pkg = tmp_path / "toy"
  (pkg / "models").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "models" / "__init__.py").write_text("")
  (pkg / "models" / "net.py").write_text("from toy import training\n")
  (pkg / "training.py").write_text("def f():\n  from toy.models import net\n")  # a function-level import
  (tmp_path / ".importlinter").write_text(
    "[importlinter]\nroot_package = toy\n\n"
    "[importlinter:contract:cycles]\nname = no cycles\ntype = acyclic_siblings\nancestors = toy\n\n"
    "[importlinter:contract:models]\nname = models below training\ntype = forbidden\n"
    "source_modules = toy.models\nforbidden_modules = toy.training\n"
  )
  proc = _lint_imports(tmp_path, "--config", ".importlinter")
  assert proc.returncode != 0
  assert "no cycles BROKEN" in proc.stdout and "models below training BROKEN" in proc.stdout, proc.stdout


def test_no_module_name_shadows_the_standard_library():
  clashes = [m for m in package_modules() if m.rpartition(".")[2] in sys.stdlib_module_names]
  assert not clashes


def test_public_api_resolves_lazily():
  """Every name of efficientad_jax.__all__ resolves; importing the package itself loads no JAX module."""
  code = (
    "import sys, efficientad_jax as e; assert 'jax' not in sys.modules, 'jax imported';"
    "import efficientad_jax.metrics; assert 'jax' not in sys.modules, 'metrics imported jax';"
    "missing = [n for n in e.__all__ if getattr(e, n, None) is None]; assert not missing, missing;"
    "print(len(e.__all__))"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout) == len(efficientad_jax.__all__) > 10


def test_public_api_names_do_not_shadow_submodules():
  submodules = {name.split(".")[1] for name in package_modules() if name.count(".") >= 1}
  assert not set(efficientad_jax.__all__) & submodules


def test_console_scripts_are_the_experiments_commands():
  """pyproject's [project.scripts] entries exist after `pip install` and run the same CLIs."""
  import shutil
  import sysconfig
  import tomllib

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert {"efficientad-train", "efficientad-evaluate", "efficientad-predict", "efficientad-export"} <= set(scripts)
  for name, target in scripts.items():
    module, _, function = target.partition(":")
    assert (REPO / (module.replace(".", "/") + ".py")).exists() and function == "command", (name, target)
  installed = pathlib.Path(sysconfig.get_path("scripts")) / "efficientad-train"  # where pip puts it
  exe = str(installed) if installed.exists() else shutil.which("efficientad-train")
  assert exe, f"efficientad-train is neither in {installed.parent} nor on PATH: pip install -e . installs it"
  proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "usage: efficientad-train" in proc.stdout, proc.stderr[-2000:]
