"""The package's imports point down: read from the source with ``ast`` (nothing is imported).

Every ``import`` and ``from ... import`` of every module under ``nemo_basic/`` counts, at module level
or inside a function (a deferred import is still a dependency; deferring only changes when it runs).
``from nemo_basic.x import name`` depends on the module ``nemo_basic.x.name`` when that is a module,
otherwise on ``nemo_basic.x``; relative imports are resolved. Not seen: ``importlib`` calls on strings
(the PEP 562 re-exports of ``convert``, ``data`` and ``export`` name only their own submodules).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, NamedTuple, Set

import pytest

_REPO = Path(__file__).resolve().parents[2]
_PACKAGE = "nemo_basic"

# The subpackages, lowest first. A module may import modules of its own subpackage and of the
# subpackages below it, never above. Read from the code (README, "Layout"): console (who prints
# what, standard library only) is the floor; supervision (the method,
# plain torch), data and pretrained need nothing of the package but compat; convert maps HF
# checkpoints onto Megatron; models builds NeVA on convert, supervision and pretrained; export reads
# and writes models; analysis works on exports; recipes wire everything. The package's own __init__
# only applies the compat backend and belongs to "compat". "testing" (tiny models, the gloo runner)
# is on top: nothing may import it (test_nothing_outside_testing_imports_it).
_LAYERS = ("console", "compat", "supervision", "data", "pretrained", "convert", "models", "export", "analysis", "recipes",
           "testing")

# Known import circles, each the exact set of modules of one strongly connected component. Being
# removed (issue 23); an entry that is no longer a circle fails the test until it is taken out.
_KNOWN_CYCLES_IN_PROGRESS: set = set()

# Known imports that point up the layers, (importing module, imported module). Being removed (issue
# 23); an entry that no longer occurs fails the test until it is taken out.
_KNOWN_UPWARD_IN_PROGRESS: set = set()


class Edge(NamedTuple):
    importer: str   # module name
    path: str       # file, relative to the repository
    line: int
    imported: str   # module name

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.imported}"


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted((_REPO / _PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(_REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _edges() -> List[Edge]:
    modules = _modules()

    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        rel = str(path.relative_to(_REPO))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                if name == _PACKAGE or name.startswith(_PACKAGE + "."):
                    target = resolve(name)
                    if target and target != module:
                        edges.append(Edge(module, rel, node.lineno, target))
    return sorted(set(edges), key=lambda e: (e.path, e.line, e.imported))


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "compat"


def _strongly_connected(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_graph_is_read():
    """The reader sees what the package is known to import (guards the other tests against an empty graph)."""
    edges = {(e.importer, e.imported) for e in _edges()}
    assert ("nemo_basic.convert.nemo_configs", "nemo_basic.convert.families") in edges  # top level
    assert ("nemo_basic.convert.megatron", "nemo_basic.convert.families") in edges      # in a function
    assert ("nemo_basic", "nemo_basic.compat") in edges
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_every_subpackage_has_a_layer():
    undeclared = sorted({_layer(m) for m in _modules()} - set(_LAYERS))
    assert not undeclared, f"subpackages of nemo_basic without a place in _LAYERS: {undeclared}"


def test_nothing_outside_testing_imports_it():
    bad = [str(e) for e in _edges()
           if _layer(e.imported) == "testing" and _layer(e.importer) != "testing"]
    assert not bad, "nemo_basic.testing is for the tests only; imported by:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    edges = _edges()
    graph: Dict[str, Set[str]] = {m: set() for m in _modules()}
    for e in edges:
        graph[e.importer].add(e.imported)
    components = [frozenset(c) for c in _strongly_connected(graph)]
    known_cycles = set(_KNOWN_CYCLES_IN_PROGRESS)  # set(): emptied as `{}` it is a dict
    problems = []
    for component in components:
        if component in known_cycles:
            continue
        inside = [str(e) for e in edges if e.importer in component and e.imported in component]
        problems.append("import cycle between " + ", ".join(sorted(component)) + ":\n    " + "\n    ".join(inside))
    for known in sorted(known_cycles - set(components), key=sorted):
        problems.append(f"{sorted(known)} is no longer a cycle: take it out of _KNOWN_CYCLES_IN_PROGRESS")
    assert not problems, "\n  ".join([""] + problems)


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(_LAYERS)}
    known_upward = set(_KNOWN_UPWARD_IN_PROGRESS)  # set(): emptied as `{}` it is a dict
    problems, seen = [], set()
    for e in _edges():
        lower, upper = _layer(e.importer), _layer(e.imported)
        if upper == "testing" and lower != "testing":
            continue  # test_nothing_outside_testing_imports_it
        if lower == upper or lower not in rank or upper not in rank or rank[upper] < rank[lower]:
            continue  # sideways within a subpackage, or down (an undeclared subpackage fails its own test)
        if (e.importer, e.imported) in known_upward:
            seen.add((e.importer, e.imported))
            continue
        allowed = ", ".join(_LAYERS[:rank[lower]]) or "nothing"
        problems.append(f"{e}: upward ({lower} may import {allowed} and itself)")
    for known in sorted(known_upward - seen):
        problems.append(f"{known[0]} no longer imports {known[1]}: take it out of _KNOWN_UPWARD_IN_PROGRESS")
    assert not problems, "\n  ".join([""] + problems)
