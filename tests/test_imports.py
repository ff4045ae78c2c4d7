"""The package's import graph has no cycle.

Built from the source with ``ast``, so every import counts: module level, inside functions
(run on first use) and under ``TYPE_CHECKING`` alike. A cycle through a lazy import works at
run time but still makes two modules one unit to read, change and test.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import otface_plugin

PACKAGE_DIR = Path(otface_plugin.__file__).parent
PACKAGE = PACKAGE_DIR.name


def modules(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (packages by their __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports. ``from a.b import c`` points at ``a.b.c`` when
    that is a module, else at ``a.b``; relative imports are resolved."""
    mods = modules(root)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in mods:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    graph[name].add(sub if sub in mods else target)
        graph[name].discard(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first, three colours)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_graph_sees_the_package_and_its_imports():
    graph = import_graph(PACKAGE_DIR)
    assert f"{PACKAGE}.bench.study" in graph and f"{PACKAGE}.ot" in graph
    # a module-level import, a lazy one inside a function, and a relative one all count
    assert f"{PACKAGE}.bench.route" in graph[f"{PACKAGE}.bench.plugin_route"]
    assert f"{PACKAGE}.bench.plugin_route" in graph[f"{PACKAGE}.bench.study"]


def test_find_cycle_reports_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(pkg)) == []


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert not cycle, "import cycle: " + " -> ".join(cycle)
