"""The library's modules import no loop (imports inside functions count: they are a loop put off,
not undone). A package's __init__, which only hands names on, is left out, as Python's own
import of a submodule through it is."""
import ast
import os

from tests.test_sweep import ROOT


def module_imports():
  """{module: the moe_jax modules it imports}, every moe_jax/**/*.py but the __init__ files."""
  package = os.path.join(ROOT, "moe_jax")
  paths = {}
  for folder, _, files in os.walk(package):
    for file in files:
      if file.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(
            folder, file)
  graph = {}
  for module, path in paths.items():
    if path.endswith("__init__.py"):
      continue
    named = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        named |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        named |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    graph[module] = {name for name in named if name in paths and name != module
                     and not paths[name].endswith("__init__.py")}
  return graph


def test_the_library_imports_no_loop():
  graph = module_imports()
  assert "moe_jax.sweep" not in graph["moe_jax.config"]
  loops, done = [], set()

  def visit(module, path):
    if module in path:
      loops.append(path[path.index(module):] + [module])
      return
    if module in done:
      return
    for imported in sorted(graph.get(module, ())):
      visit(imported, path + [module])
    done.add(module)

  for module in sorted(graph):
    visit(module, [])
  assert loops == []
