"""The direction of imports: every module's imports (module-level, function-level and
TYPE_CHECKING ones) go one way between the rooms of the house, and no module imports itself
back through others (no circles). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specdraft", "verifier", "index_builder", "retriever", "protos")
# The rooms, most specific prefix first, and the rooms each may import from.
BASE = "retriever.base"
ROOMS: dict[str, tuple[str, ...]] = {
    "protos": (),
    BASE: ("protos",),
    "retriever.store": (BASE,),
    "retriever.drafting": (BASE, "retriever.store"),
    "retriever.outputlog": (BASE, "retriever.drafting"),
    "retriever.client": (BASE, "retriever.drafting.types", "protos"),
    "retriever.service": (BASE, "retriever.store", "retriever.drafting", "retriever.outputlog", "protos"),
    "index_builder": (BASE, "retriever.store"),
    "verifier.decoding": (BASE, "retriever.drafting.types"),
    "verifier.drafting": (BASE, "retriever.drafting.types", "retriever.client", "verifier.decoding"),
    "verifier.api": (BASE, "retriever.drafting.types", "retriever.client", "verifier.decoding", "verifier.drafting",
                     "protos"),
    "specdraft": ("*",),
}
BASE_MODULES = ("retriever", "retriever._core", "retriever.errors", "retriever.status", "retriever.config",
                "retriever.placement",
                "retriever.credentials", "retriever.logs")


def room_of(module: str) -> str:
    """The room of a module: BASE for the retriever's shared base, else the longest ROOMS prefix."""
    if module in BASE_MODULES:
        return BASE
    best = ""
    for room in ROOMS:
        if (module == room or module.startswith(room + ".")) and len(room) > len(best):
            best = room
    if not best:
        raise AssertionError(f"module {module} must belong to a room of ROOMS, got none")
    return best


def allowed(source: str, target: str) -> bool:
    """Whether `source` may import `target` (same room, or a room `source`'s room may use)."""
    src, dst = room_of(source), room_of(target)
    if src == dst or "*" in ROOMS[src]:
        return True
    return any(target == r or target.startswith(r + ".") or dst == r for r in ROOMS[src])


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """{dotted module name: source} of every project module (generated stubs included)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def imports_of(module: str, source: str, modules: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its body (a `from X import Y` of a
    submodule Y counts as X.Y)."""
    is_package = False  # relative imports are resolved against the module's package
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """'A -> B' for every import against the rooms' direction, and 'circle: A -> B -> A' for each circle."""
    modules = set(sources) | {"retriever._core"}
    graph = {m: imports_of(m, s, modules) for m, s in sources.items()}
    bad = [f"{m} -> {t} ({room_of(m)} must not import {room_of(t)})"
           for m in sorted(graph) for t in sorted(graph[m]) if not allowed(m, t)]
    return bad + [f"circle: {' -> '.join(c)}" for c in circles(graph)]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [min(component)])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way_without_circles():
    assert violations(module_sources()) == []


@pytest.mark.parametrize("planted, expected", [
    ({"retriever.store.bad": "from retriever.service import server\n"}, "retriever.store.bad -> retriever.service"),
    ({"verifier.decoding.bad": "def f():\n    from verifier.api import server\n"},
     "verifier.decoding.bad -> verifier.api"),
    ({"retriever.client.bad": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from retriever.service import settings\n"}, "retriever.client.bad -> retriever"),
    ({"retriever.store.a": "from retriever.store import b\n", "retriever.store.b": "import retriever.store.a\n"},
     "circle: retriever.store.a -> retriever.store.b -> retriever.store.a"),
])
def test_a_planted_violation_is_found(planted, expected):
    sources = {**module_sources(), **planted}
    found = violations(sources)
    assert any(v.startswith(expected) for v in found), found
