"""The shape of the code: one direction of dependence, small units, plug-in registries.

These parse the source (nothing heavy is imported), so they run in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "adaptkit"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, known: set[str]):
    """Every adaptkit module a module imports when it runs, function-level (lazy) imports included and
    ``if TYPE_CHECKING:`` blocks (annotations only) left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("adaptkit"):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaptkit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in known else node.module
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(ast.parse(path.read_text()), known) if m in known and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_imports_go_one_way():
    """No module of adaptkit imports, directly or through others, a module that imports it back: the
    recipe loader at the bottom, artifacts below runs, runs below export and inference."""
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    reach = _reachable(graph)
    for low, high in [
        ("adaptkit.artifacts", "adaptkit.runs"),
        ("adaptkit.runs", "adaptkit.export"),
        ("adaptkit.runs", "adaptkit.inference"),
        ("adaptkit.model.multimodal", "adaptkit.tasks"),
        ("adaptkit.tasks", "adaptkit.train.loop"),
    ]:
        assert high not in reach[low], f"{low} must not depend on {high}"
    assert "adaptkit.export" not in reach["adaptkit.inference"]
    assert "adaptkit.config" not in reach["adaptkit.tasks"] | reach["adaptkit.adapters"]  # registries
    # The recipe schema is the floor: it reaches only itself (lazy imports included); the registry checks
    # sit one floor up, in adaptkit.recipes.
    config = [m for m in graph if m == "adaptkit.config" or m.startswith("adaptkit.config.")]
    assert len(config) >= 5
    for module in config:
        assert reach[module] <= set(config), f"{module} reaches {sorted(reach[module] - set(config))}"
    assert {"adaptkit.tasks", "adaptkit.adapters"} <= reach["adaptkit.recipes"]


def _reachable(graph):
    out = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        out[start] = seen
    return out


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = ast.parse("def f():\n    from adaptkit.x import y\nif TYPE_CHECKING:\n    import adaptkit.z\n")
    assert list(_imports(lazy, {"adaptkit.x"})) == ["adaptkit.x"]


@pytest.mark.parametrize("folder", ["adaptkit", "app"])
def test_modules_and_functions_stay_small(folder):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        source = path.read_text()
        rel = path.relative_to(ROOT)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split these: " + "; ".join(too_long)


def test_registries_are_plain_dicts_of_implementations():
    from adaptkit.adapters import ADAPTERS
    from adaptkit.adapters.base import FusionAdapter
    from adaptkit.objectives import OBJECTIVES
    from adaptkit.tasks import TASKS
    from adaptkit.tasks.base import Task

    assert type(ADAPTERS) is dict and all(issubclass(c, FusionAdapter) for c in ADAPTERS.values())
    assert type(TASKS) is dict and all(issubclass(c, Task) and c.name == n for n, c in TASKS.items())
    assert type(OBJECTIVES) is dict and all(callable(f) for f in OBJECTIVES.values())


def test_recipe_names_are_checked_against_the_registries():
    from adaptkit.config import RecipeError
    from adaptkit.recipes import load_recipe

    recipe = "recipes/easyvqa_qformer_lora.yaml"
    with pytest.raises(RecipeError, match="task='captions' is not one of vqa"):
        load_recipe(ROOT / recipe, ["task=captions"])
    with pytest.raises(RecipeError, match="adapter.kind='mlp' is not one of qformer"):
        load_recipe(ROOT / recipe, ["adapter.kind=mlp"])
