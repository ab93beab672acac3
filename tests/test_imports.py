"""The package's import graph has no cycles: every import statement of `memjax` and
`pallas_kernels`, function-local ones included, read from the source. Importing a module also
runs its parent packages' `__init__`, so those count as imported too, except a module's own
parents (Python runs them before the module whatever it imports)."""

import ast
import pathlib

import pytest

from pallas_kernels import impls

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("memjax", "pallas_kernels")


def module_names() -> dict[str, pathlib.Path]:
  names = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def imported(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules `name` imports, with the parents each of them brings in."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, base] if base else anchor)
      # `from a import b` imports a.b when b is a module, else reads a name of a.
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      parts = target.split(".")
      found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
  parts = name.split(".")
  own_parents = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
  return found - own_parents


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_module_imports_in_a_circle():
  names = module_names()
  graph = {name: imported(name, path, set(names)) for name, path in names.items()}
  assert graph["memjax.ops.dispatch"] >= {"pallas_kernels.impls"}  # the reader sees imports
  # Dispatch imports the table's kernel packages by name (importlib).
  graph["memjax.ops.dispatch"] |= {impl.package for impl in impls.IMPLS}
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles(graph) == []


@pytest.mark.parametrize("module,forbidden", [
    ("memjax.config", "memjax.interop"),
    ("pallas_kernels.impls", "pallas_kernels."),
])
def test_the_schema_knows_no_file_format_and_the_impl_table_no_kernel(module, forbidden):
  names = module_names()
  found = imported(module, names[module], set(names))
  assert not [m for m in found if m.startswith(forbidden)]
