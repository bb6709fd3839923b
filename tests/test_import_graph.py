"""The module import graph of mlsml is a one-way DAG, with no function-local imports dodging a cycle.

Parsed with ``ast`` (nothing is imported). A function-level ``from .x import`` or
``import mlsml...`` is allowed only with a comment saying it is a lazy import of a
heavy dependency (on its line or the line above, containing ``lazy``), as
``tests/test_import.py`` requires ``import mlsml`` to stay fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mlsml"

#: Modules exempt from the checks (none: the mixregls/ split has landed). Keep it empty.
PENDING: set[str] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def _target(node: ast.ImportFrom | ast.Import, module: str) -> list[str]:
    pkg_parts = module.split(".")[:-1]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            mod = node.module or ""
            if not mod.startswith("mlsml"):
                return []
            base = mod.split(".")[1:]
        else:
            base = pkg_parts[: len(pkg_parts) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        if node.module is None:  # from . import a, b
            return [".".join(base + [a.name]) for a in node.names]
        return [".".join(base)]
    return [".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("mlsml.")]


def _imports():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        local = set()
        typing_only = set()
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are never executed
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only |= {id(sub) for sub in ast.walk(node)}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(fn):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        local.add(id(sub))
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                for t in _target(node, name):
                    if t and t != "__init__":
                        here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                        edges.append((t, id(node) in local, "lazy" in here.lower(), node.lineno))
        out[name] = edges
    return out


def _known(name: str, modules) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def test_no_function_local_imports_of_mlsml_modules():
    bad = []
    for module, edges in _imports().items():
        if module in PENDING:
            continue
        for target, local, lazy, line in edges:
            if local and not lazy:
                bad.append(f"mlsml/{module.replace('.', '/')}.py:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle():
    imports = _imports()
    graph = {m: set() for m in imports}
    for module, edges in imports.items():
        if module in PENDING or module == "__init__":
            continue
        for target, _local, _lazy, _line in edges:
            t = _known(target, graph)
            if t and t != module and t not in PENDING:
                graph[module].add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
