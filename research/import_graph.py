"""The import graph of l3spot's packages, read from the source (AST), and its cycles.

``python -m research.import_graph`` prints the package-level graph of ``core``, ``service``,
``worker``, ``research`` and ``l3spot.py`` (which subpackage imports which), the layer rules
that were broken (``core`` imports nothing of the others; ``service`` nothing of ``worker`` or
``research``) and every import cycle between modules, then exits 1 if there is a cycle or a
broken rule. ``--modules`` prints the module-level graph as well.

Two readings of "imports", both from the AST without importing anything:

- *module level*: statements that run when the module is imported (top level, including
  inside top-level ``if``/``try``), except ``if TYPE_CHECKING:`` blocks. These are the edges
  that can form an import cycle.
- *anywhere*: module level plus imports inside functions and methods, and ``TYPE_CHECKING``
  blocks. The layer rules use this reading: a function-level import of ``worker`` from
  ``service`` still loads ``worker`` (and torch) into the node when that function runs.

``from pkg import name`` counts as an import of ``pkg.name`` when that is a module of the
project, else of ``pkg``. Parent packages are not counted as imported (their ``__init__``
runs first, but a package importing its own submodules is not a cycle in practice).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The project's top-level packages and single modules, in the order of the data flow.
PACKAGES = ("core", "service", "worker", "research")
SINGLE_MODULES = ("l3spot",)

#: Layer rules: a package (key) must not import these packages (values), at any level.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("service", "worker", "research", "l3spot"),
    "service": ("worker", "research"),
    "worker": ("service", "research"),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from ``source``."""

    source: str  # importing module, dotted
    target: str  # imported project module, dotted
    lineno: int
    module_level: bool  # runs when ``source`` is imported (not in a function, not TYPE_CHECKING)
    type_checking: bool  # inside ``if TYPE_CHECKING:``


@dataclass
class ImportGraph:
    """Modules of the project and the imports between them (project modules only)."""

    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)

    def edges(self, *, module_level_only: bool = True) -> dict[str, set[str]]:
        """``{module: {imported modules}}``; with ``module_level_only`` the edges that run at
        import time (cycle candidates), else every import anywhere in the file."""
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if module_level_only and not imp.module_level:
                continue
            if imp.target != imp.source:
                out[imp.source].add(imp.target)
        return out

    def package_edges(self, depth: int = 2) -> dict[str, set[str]]:
        """The graph collapsed to packages of ``depth`` dotted parts (``worker.locator``)."""
        out: dict[str, set[str]] = {}
        for src, targets in self.edges(module_level_only=False).items():
            a = package_of(src, depth)
            out.setdefault(a, set())
            for t in targets:
                b = package_of(t, depth)
                if a != b:
                    out[a].add(b)
        return out

    def violations(self) -> list[Import]:
        """Imports (anywhere) that break :data:`FORBIDDEN`."""
        bad = []
        for imp in self.imports:
            src_top = imp.source.split(".")[0]
            if imp.target.split(".")[0] in FORBIDDEN.get(src_top, ()):
                bad.append(imp)
        return bad

    def cycles(self) -> list[list[str]]:
        """Every strongly connected group of modules with more than one member (or a
        self-import), each as one cycle through it: ``[a, b, ..., a]``."""
        graph = self.edges(module_level_only=True)
        found = []
        for scc in _strongly_connected(graph):
            if len(scc) > 1:
                found.append(_one_cycle(graph, sorted(scc)))
        return sorted(found)


def package_of(module: str, depth: int) -> str:
    """``module`` shortened to ``depth`` dotted parts (a single-file module stays itself)."""
    return ".".join(module.split(".")[:depth])


def discover(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for the project's packages and single modules."""
    modules: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for name in SINGLE_MODULES:
        if (root / f"{name}.py").is_file():
            modules[name] = root / f"{name}.py"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    body: Iterable[ast.stmt], module_level: bool, type_checking: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Import statements in ``body`` with (module_level, type_checking) flags."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, module_level and not type_checking, type_checking
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(node.body, False, type_checking)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, module_level, type_checking)
        elif isinstance(node, ast.If):
            tc = type_checking or _is_type_checking(node.test)
            yield from _walk(node.body, module_level, tc)
            yield from _walk(node.orelse, module_level, type_checking)
        elif isinstance(node, ast.Try | ast.With | ast.For | ast.While):
            handlers = [
                h for h in getattr(node, "handlers", []) if isinstance(h, ast.ExceptHandler)
            ]
            stmts = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            for handler in handlers:
                stmts.extend(handler.body)
            yield from _walk(stmts, module_level, type_checking)


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute dotted name of a ``from ... import`` statement's module."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in (``None`` if not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def build(root: Path = ROOT) -> ImportGraph:
    """Parse every module of the project and collect its imports of project modules."""
    modules = discover(root)
    graph = ImportGraph(modules)
    for source, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, module_level, type_checking in _walk(tree.body, True, False):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(source, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for name in targets:
                target = _project_target(name, modules)
                if target is not None:
                    graph.imports.append(
                        Import(source, target, node.lineno, module_level, type_checking)
                    )
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    scc.add(m)
                    if m == node:
                        break
                out.append(scc)
    return out


def _one_cycle(graph: dict[str, set[str]], scc: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected group."""
    members = set(scc)
    start = scc[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if nxt not in prev:
                    prev[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return [*scc, scc[0]]


def main(argv: list[str] | None = None) -> int:
    """Print the package graph, the broken layer rules and the cycles; 1 if any."""
    parser = argparse.ArgumentParser(prog="python -m research.import_graph", description=__doc__)
    parser.add_argument("--depth", type=int, default=2, help="package depth (1: core, worker)")
    parser.add_argument("--modules", action="store_true", help="also print the module graph")
    args = parser.parse_args(argv)

    graph = build()
    print(f"{len(graph.modules)} modules, {len(graph.imports)} project imports")
    print(f"\npackage graph (depth {args.depth}, imports anywhere in a file):")
    for pkg, targets in sorted(graph.package_edges(args.depth).items()):
        print(f"  {pkg:<24} -> {', '.join(sorted(targets)) or '-'}")
    if args.modules:
        print("\nmodule graph (module-level imports):")
        for mod, targets in sorted(graph.edges().items()):
            print(f"  {mod:<32} -> {', '.join(sorted(targets)) or '-'}")

    bad = graph.violations()
    print(f"\nlayer rules broken: {len(bad)}")
    for imp in bad:
        where = (
            "module level"
            if imp.module_level
            else "TYPE_CHECKING"
            if imp.type_checking
            else ("in a function")
        )
        print(f"  {imp.source}:{imp.lineno} imports {imp.target} ({where})")
    cycles = graph.cycles()
    print(f"import cycles (module level): {len(cycles)}")
    for cyc in cycles:
        print("  " + " -> ".join(cyc))
    return 1 if bad or cycles else 0


if __name__ == "__main__":
    sys.exit(main())
