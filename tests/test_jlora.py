"""The package itself (docs/ARCHITECTURE.md): each folder is one layer and imports only from
the layers below it, function-level imports included; no two modules import each other,
directly or around a loop; the package root holds only entry points; every test module
names its module."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jlora"


# Bottom to top. The root's modules (the package itself, the command, the demo, the
# notebook helpers) sit above every layer.
LAYERS = ("infra", "kernels", "core", "models", "data", "interop", "findings", "run",
          "objectives", "study")


ROOT = ("jlora", "jlora.cli", "jlora.demo", "jlora.notebook")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
  """Every jlora module ``name`` imports, anywhere in it (module or function level)."""
  path = MODULES[name]
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
      if target in MODULES and target != name:
        found.add(target)
  return found


GRAPH = {name: _imports(name) for name in MODULES}


def layer(name: str) -> int:
  if name in ROOT:
    return len(LAYERS)
  return LAYERS.index(name.split(".")[1])


def test_every_module_belongs_to_a_layer_and_the_root_holds_entry_points_only():
  root = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert root == ["__init__.py", "cli.py", "demo.py", "notebook.py"] and len(root) <= 8
  assert not list(PACKAGE.rglob("setup.py"))  # reads as packaging
  for name in MODULES:
    layer(name)  # raises for a module outside the layers


def test_imports_only_go_downward():
  upward = [f"{name} ({LAYERS[layer(name)] if layer(name) < len(LAYERS) else 'root'}) "
            f"imports {dep}" for name, deps in GRAPH.items() for dep in deps
            if layer(dep) > layer(name)]
  assert not upward, "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_no_import_loops_between_modules():
  assert _cycles(GRAPH) == []


@pytest.mark.parametrize("graph,loops", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_loop_finder_finds_loops(graph, loops):
  assert _cycles(graph) == loops


def test_the_import_reader_sees_function_level_and_relative_imports():
  assert "jlora.objectives.rl.rewards" in GRAPH["jlora.objectives.rl"]  # module level
  assert "jlora.study.layers_study" in GRAPH["jlora.study"]  # inside a function


TESTS = pathlib.Path(__file__).resolve().parent


def module_under_test(path: pathlib.Path) -> str | None:
  """The module a test file is for, by the rule in docs/ARCHITECTURE.md: the tests of
  ``jlora.a.b`` are ``tests/a/test_b.py`` (of the package itself: ``tests/test_jlora.py``);
  ``tests/e2e/`` holds the tests that cross modules end to end. None: an e2e file."""
  parts = path.relative_to(TESTS).with_suffix("").parts
  if parts[0] == "e2e":
    return None
  assert parts[-1].startswith("test_"), path
  name = parts[-1].removeprefix("test_")
  return "jlora" if parts == ("test_jlora",) else ".".join(("jlora", *parts[:-1], name))


def test_every_test_module_is_named_for_its_module():
  files = sorted(TESTS.rglob("test_*.py"))
  orphans = [str(p.relative_to(TESTS)) for p in files
             if (m := module_under_test(p)) is not None and m not in MODULES]
  assert not orphans, f"test files without a module of their name: {orphans}"
  # the rule itself, on names that break it
  assert module_under_test(TESTS / "run" / "test_loop.py") == "jlora.run.loop"
  assert module_under_test(TESTS / "objectives" / "rl" / "test_losses.py") == \
      "jlora.objectives.rl.losses"
  assert module_under_test(TESTS / "run" / "test_trainer.py") not in MODULES
  assert module_under_test(TESTS / "e2e" / "test_anything.py") is None
