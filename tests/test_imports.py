"""No import cycles between the modules of the efficientad_jax package.

Every module is found with pkgutil.walk_packages and parsed with `ast` (nothing is executed). An import at
module level (also inside a module-level if/try/with, or a class body) runs when the module is imported:
a cycle among those fails. Imports inside functions run later and are counted separately: the graph of
both kinds together must be free of cycles too, so that no two modules lean on each other at all.
"""

import ast
import importlib.util
import pkgutil

import efficientad_jax

PACKAGE = "efficientad_jax"
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def package_modules() -> dict[str, str]:
  """{module name: source file} of every module and subpackage of the package."""
  names = [PACKAGE] + [m.name for m in pkgutil.walk_packages(efficientad_jax.__path__, PACKAGE + ".")]
  return {name: importlib.util.find_spec(name).origin for name in names}


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
  """Package modules whose code an import statement needs: `from P import m` needs the submodule P.m (P's
  __init__ runs as a parent package, before any of its modules, and is no edge); `from P import name` of
  anything else needs P itself."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in known]
  base = module if is_package else module.rpartition(".")[0]
  for _ in range(node.level - 1):
    base = base.rpartition(".")[0]
  source = ".".join(p for p in (base if node.level else "", node.module or "") if p)
  found = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
  return ([source] if source in known and len(found) < len(node.names) else []) + found


def imports(module: str, path: str, known: set[str]) -> tuple[set[str], set[str]]:
  """(modules imported at module level, modules imported inside functions) by `module`."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_package = path.endswith("__init__.py")
  top, late = set(), set()

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        (late if in_function else top).update(_targets(child, module, is_package, known))
      visit(child, in_function or isinstance(child, _FUNCTIONS))

  visit(tree, False)
  return top - {module}, late - {module} - top


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the directed graph, or None (depth-first search, iterative)."""
  state = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def import_graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """(module-level graph, module-level + function-level graph) of the package."""
  modules = package_modules()
  known = set(modules)
  top, both = {}, {}
  for name, path in modules.items():
    eager, late = imports(name, path, known)
    top[name], both[name] = eager, eager | late
  return top, both


def test_the_parser_and_the_cycle_finder():
  top, both = import_graphs()
  assert "efficientad_jax.saved_model" in top["efficientad_jax.inference"]  # from efficientad_jax import ...
  assert "efficientad_jax.ast.efficientnet" in top["efficientad_jax.ast.method"]
  assert "efficientad_jax.saved_model" in both["efficientad_jax.export"] - top["efficientad_jax.export"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_at_module_level():
  top, _ = import_graphs()
  cycle = find_cycle(top)
  assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_counting_function_level_imports():
  _, both = import_graphs()
  cycle = find_cycle(both)
  assert cycle is None, "import cycle (with imports inside functions): " + " -> ".join(cycle)


def test_public_api_resolves_lazily():
  """Every name of efficientad_jax.__all__ resolves; importing the package itself loads no JAX module."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, efficientad_jax as e; assert 'jax' not in sys.modules, 'jax imported';"
          "import efficientad_jax.metrics; assert 'jax' not in sys.modules, 'metrics imported jax';"
          "missing = [n for n in e.__all__ if getattr(e, n, None) is None]; assert not missing, missing;"
          "print(len(e.__all__))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout) == len(efficientad_jax.__all__) > 10


def test_public_api_names_do_not_shadow_submodules():
  submodules = {name.split(".")[1] for name in package_modules() if name.count(".") >= 1}
  assert not set(efficientad_jax.__all__) & submodules
