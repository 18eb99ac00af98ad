"""The import graph of ``raydistill/``: no cycles, and the stages meet only through what they wrote.

Read from the source (``ast``), so it sees the lazy imports inside functions too: a cycle through a
function-level import still ties the two modules together, and a stage that imports another stage
lazily still depends on it. No module is imported here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raydistill"
STAGES = ("generate", "train", "evaluate", "serve")
# Evaluate answers its prompts with generate's engine functions and times the served arms with
# serve's HTTP client; no other stage uses another stage's code.
ALLOWED = {("evaluate", "generate"), ("evaluate", "serve")}


def module_names() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's ``__init__``)."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module → the ``raydistill`` modules it imports anywhere in its source (relative or absolute;
    ``from . import x`` counts as importing the module ``x``)."""
    mods = module_names()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in mods and c != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_the_graph_sees_relative_absolute_and_lazy_imports():
    graph = import_graph()
    assert "raydistill.config" in graph["raydistill.layout"]  # `from .config import Config`, top level
    assert "raydistill.runtime" in graph["raydistill.cli"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in raydistill/ (each line: modules that import each other):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_a_stage_imports_no_other_stage():
    wrong = sorted((m, d) for m, deps in import_graph().items() for d in deps
                   if stage_of(m) and stage_of(d) and stage_of(m) != stage_of(d)
                   and (stage_of(m), stage_of(d)) not in ALLOWED)
    assert not wrong, "a stage imports another stage's code (meet through the run folder instead):\n" + \
        "\n".join(f"{m} imports {d}" for m, d in wrong)
