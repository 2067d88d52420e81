"""The package's shape: no import cycles, dependencies pointing down, small functions.

Read from the source with `ast`, so the rules hold for every module whether or not a
test happens to import it. Imports under `if TYPE_CHECKING:` are for annotations only
and do not count; imports inside functions do (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "framework"

# Lower number = lower layer. A module may import its own layer or any lower one.
LAYERS = {
    "framework.transport": 0,
    "framework.observability": 0,
    "framework.errors": 0,
    "framework.types": 0,
    "framework.streams": 1,
    "framework.context": 1,
    "framework.rpc": 2,
    "framework.events": 2,
    "framework.jobs": 2,
    "framework.client": 3,
    "framework.service": 4,
    "framework.runner": 5,
    "framework.dev": 6,
    "framework.testing": 7,
    "framework.web": 7,
    "framework.cli": 8,
    "framework": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # `from pkg import mod` names a module when pkg/mod.py exists
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _known(name: str, modules: set[str]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        tree = ast.parse(path.read_text())
        targets: set[str] = set()
        for node in _runtime_imports(tree):
            for target in _resolve(name, path.name == "__init__.py", node):
                known = _known(target, modules)
                if known and known != name and not name.startswith(known + "."):
                    targets.add(known)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return cycles


def layer_of(module: str) -> int:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return LAYERS[best]


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_dependencies_point_down() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target != "framework" and layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_library_never_imports_the_sample_app() -> None:
    offenders = [
        f"{module_name(path)} imports {target}"
        for path in PACKAGE.rglob("*.py")
        for node in _runtime_imports(ast.parse(path.read_text()))
        for target in _resolve(module_name(path), path.name == "__init__.py", node)
        if target == "services" or target.startswith("services.")
    ]
    assert offenders == []


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("limit", [50])
def test_functions_are_small(limit: int) -> None:
    long_ones = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length >= limit:
                long_ones.append(f"{module_name(path)}.{fn.name}: {length} lines")
    assert long_ones == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
