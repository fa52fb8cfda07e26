"""The import graph of src/erasekit (issue #19): no circles, and only the CLI imports the CLI.

Every import counts, those inside functions too (a lazy import still ties two modules into one knot); imports
under ``if TYPE_CHECKING:`` never run and do not count. An edge goes to the module named (``from erasekit.a
import b`` names ``erasekit.a.b`` when that is a module, else ``erasekit.a``), not to the packages above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "erasekit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in modules else _resolve(base, modules))
    return {m for m in found if m and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_cli(module: str) -> bool:
    return module == "erasekit.cli" or module.startswith("erasekit.cli.")


def test_the_checker_finds_a_circle_and_resolves_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    modules = {"erasekit.bench": None, "erasekit.bench.plan": None, "erasekit.store": None, "erasekit.cli.common": None}
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom erasekit.bench import plan\nfrom .store import content_key\n"
                   "def f():\n    from erasekit.cli.common import fail\n"
                   "if TYPE_CHECKING:\n    from erasekit.bench.spec import BenchConfig\n")
    assert _imports("erasekit.m", src, modules) == {"erasekit.bench.plan", "erasekit.store", "erasekit.cli.common"}


def test_no_import_circles():
    found = cycles(import_graph())
    graph = import_graph()
    described = ["; ".join(f"{m} -> {', '.join(sorted(t for t in graph[m] if t in c))}" for m in c) for c in found]
    assert not found, "import circles:\n" + "\n".join(described)


def test_only_the_cli_imports_the_cli():
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if _is_cli(t) and not _is_cli(m) and m != "erasekit.__main__")
    assert not upward, f"library modules import the CLI: {upward}"
