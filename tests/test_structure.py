"""The product's shape: no import circle between its modules, and no function a reader must
hold in their head for more than a screen (about 60 lines).

Imports are read from the source (every `import` and `from ... import`, at module level or inside
functions, since an import inside a function is how a circle is usually hidden)."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The installed import names of the repository's folders (setup.py package_dir).
PACKAGES = {"bmvae_tf": "bmvae_tf", "bmvae_tf.pipeline": "pipeline", "bmvae_tf.trainers": "trainers"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def _imports(name: str, tree: ast.AST) -> set[str]:
    """The product modules that module `name` imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_product_has_no_import_circle():
    graph = {name: _imports(name, tree) for name, tree in TREES.items()}
    assert sum(map(len, graph.values())) > 50, "the import graph looks empty: is the scan broken?"
    assert import_cycles(graph) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_is_longer_than_a_screen(name):
    too_long = [f"{MODULES[name].relative_to(REPO)}:{node.lineno} {node.name} "
                f"({node.end_lineno - node.lineno + 1} lines)"
                for node in ast.walk(TREES[name])
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert too_long == []
