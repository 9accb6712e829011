#!/usr/bin/env python3
"""The import graph of ``appliance/``: modules, floors, imports running back up, cycles.

Read from the modules' own ``import`` / ``from`` statements with ``ast`` (top level and inside
functions alike; only imports under ``if TYPE_CHECKING:`` are left out, as they never run). An
edge ``a -> b`` means module ``a`` imports ``b`` (a package import counts as importing its
``__init__``; ``from pkg import name`` counts the submodule ``pkg.name`` when there is one).

Floors: the cycles' modules are merged into one node each, then a module's floor is 0 when it
imports nothing of ours, else one above the highest floor it imports. An upward edge is one into a
module of the same or a higher floor (only possible inside a cycle). Run as a script it prints
the figures, and every cycle; ``tests/unit/test_import_graph.py`` fails on any cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "appliance"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``{"appliance.x.y": path}`` for every module of the package."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs, wherever it sits (``if TYPE_CHECKING:`` blocks skipped)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@dataclass(frozen=True)
class Graph:
    edges: dict[str, set[str]]

    @property
    def modules(self) -> list[str]:
        return sorted(self.edges)

    def cycles(self) -> list[list[str]]:
        """The strongly connected components of more than one module (or one importing itself), sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        found: list[list[str]] = []
        counter = [0]

        def visit(v: str) -> None:  # Tarjan's algorithm; the graph is small enough to recurse
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
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
                if len(component) > 1 or v in self.edges[v]:
                    found.append(sorted(component))

        for v in self.modules:
            if v not in index:
                visit(v)
        return sorted(found)

    def cycle_path(self, component: list[str]) -> list[str]:
        """One closed import path through a component, for the failure message: a -> b -> ... -> a."""
        members = set(component)
        start = component[0]
        path, seen = [start], {start}
        while True:
            nexts = sorted(w for w in self.edges[path[-1]] if w in members)
            back = [w for w in nexts if w in seen]
            if back:
                return [*path[path.index(back[0]):], back[0]]
            path.append(nexts[0])
            seen.add(nexts[0])

    def floors(self) -> dict[str, int]:
        """Each module's floor (longest import path below it, cycles merged into one node)."""
        node_of = {m: m for m in self.modules}
        for component in self.cycles():
            for m in component:
                node_of[m] = component[0]
        merged: dict[str, set[str]] = {}
        for a, targets in self.edges.items():
            merged.setdefault(node_of[a], set()).update(node_of[b] for b in targets if node_of[b] != node_of[a])
        floor: dict[str, int] = {}

        def level(n: str) -> int:
            if n not in floor:
                floor[n] = 1 + max((level(b) for b in merged[n]), default=-1)
            return floor[n]

        return {m: level(node_of[m]) for m in self.modules}

    def upward_edges(self) -> list[tuple[str, str]]:
        floor = self.floors()
        return sorted((a, b) for a, targets in self.edges.items() for b in targets if floor[b] >= floor[a])


def build_graph(root: Path = ROOT) -> Graph:
    names = module_names(root)
    edges: dict[str, set[str]] = {m: set() for m in names}
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                           for alias in node.names]
            for target in targets:
                while target and target not in names:  # `import appliance.x.y.z` of a name: its module
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != module:
                    edges[module].add(target)
    return Graph(edges)


def summary(graph: Graph) -> str:
    floors = graph.floors()
    cycles = graph.cycles()
    lines = [f"{len(graph.modules)} modules on {max(floors.values()) + 1} floors, "
             f"{len(graph.upward_edges())} imports running back up, {len(cycles)} import cycles"]
    for component in cycles:
        lines.append(f"cycle of {len(component)}: " + " -> ".join(graph.cycle_path(component)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(build_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)))
